"""Which base an adapter was trained on: the fingerprint, the provenance file, the refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from carpool.orchestrator.after_training.adapter_args import (
    AdapterArgumentError,
    check_same_base,
    named_adapters,
)
from carpool.workers.base.base_fingerprint import (
    PROVENANCE_FILE,
    base_fingerprint,
    read_provenance,
    trained_on_other_base,
)
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import job
from tests.helpers.peft_reference import save_peft_adapter


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("other-base"), hidden_size=32, num_heads=2)


def test_fingerprint_names_the_model_not_the_path(tiny_base: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["_name_or_path"] = "somewhere/else"  # who saved it, not what it is
    (copy / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(copy)) == base_fingerprint(str(tiny_base))
    config["num_attention_heads"] = 2  # same tensors, another model
    (copy / "config.json").write_text(json.dumps(config))
    base_fingerprint.cache_clear()
    assert base_fingerprint(str(copy)) != base_fingerprint(str(tiny_base))


def test_fingerprint_of_an_unknown_base_is_none(tmp_path: Path) -> None:
    assert base_fingerprint(str(tmp_path / "nothing-here")) is None


def test_an_exported_adapter_records_its_base(
    tiny_base: Path, other_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base))
    spec = job("a", tiny_base, datasets["text"], AdapterSpec(r=2, lora_alpha=4), max_steps=1)
    engine.add_job(spec)
    out = engine.export("a", tmp_path / "a")
    record = read_provenance(out)
    assert record == {
        "base_model": str(tiny_base),
        "base_fingerprint": base_fingerprint(str(tiny_base)),
        "adapter_kind": "lora",
    }
    assert trained_on_other_base(out, str(tiny_base)) is None
    why = trained_on_other_base(out, str(other_base))
    assert why is not None and str(tiny_base) in why and str(other_base) in why
    with pytest.raises(AdapterArgumentError, match="trained on base"):
        check_same_base({"a": out}, str(other_base))


def test_an_adapter_made_elsewhere_has_no_record_and_passes(tiny_base: Path, tmp_path: Path):
    out = save_peft_adapter(tiny_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    assert not (out / PROVENANCE_FILE).exists()
    check_same_base({"peft": out}, str(tiny_base))


def test_adapter_arguments(tiny_base: Path, tmp_path: Path) -> None:
    a = save_peft_adapter(tiny_base, tmp_path / "first", r=2, target_modules=["q_proj"])
    assert named_adapters([str(a), f"second={a}"]) == {"first": a, "second": a}
    with pytest.raises(AdapterArgumentError, match="'first' is already used"):
        named_adapters([str(a), f"first={a}"])
    with pytest.raises(AdapterArgumentError, match="no adapter_config.json"):
        named_adapters([f"x={tmp_path}"])
    with pytest.raises(AdapterArgumentError, match="not a directory"):
        named_adapters([str(tmp_path / "missing")])
