"""A base validated once is validated again from its kept facts, with the same findings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.spec_check.validation import ValidationCache, check_spec
from carpool.workers.base.base_facts import read_base_facts

# What the second process reports: whether Llama's configuration and model code were imported.
PROBE = """
import json, sys
from pathlib import Path
from carpool.orchestrator.spec_check.validation import validate_files
validate_files([Path(sys.argv[1])])
llama = "transformers.models.llama."
print(json.dumps({m: llama + m in sys.modules for m in ("configuration_llama", "modeling_llama")}))
"""


def _spec(base: Path, data: Path, **adapter: object) -> dict:
    return {
        "name": "kept",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **adapter},
        "training": {"max_steps": 2, "batch_size": 2, "max_seq_length": 8},
    }


def test_a_second_validation_imports_no_model_code(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_spec(tiny_base, datasets["text"])))
    env = {"CARPOOL_CACHE_DIR": str(tmp_path / "cache")}
    imported = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(job)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        )
        imported.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert imported[0] == {"configuration_llama": True, "modeling_llama": True}
    assert imported[1] == {"configuration_llama": False, "modeling_llama": False}


def test_kept_facts_give_the_same_findings(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARPOOL_CACHE_DIR", str(tmp_path / "cache"))
    specs = [
        _spec(tiny_base, datasets["text"]),
        _spec(tiny_base, datasets["messages"], target_modules=["q_proj", "qproj"], r=65),
        _spec(tiny_base, datasets["prompt_completion"], rank_pattern={"k_proj": 2}),
    ]
    cold = [check_spec(spec, f"job{i}.yaml") for i, spec in enumerate(specs)]
    assert read_base_facts(str(tiny_base)) is not None
    warm = [check_spec(spec, f"job{i}.yaml") for i, spec in enumerate(specs)]
    assert warm == cold
    assert [len(found) for found in cold] == [0, 2, 1]  # an unknown target, r too big; the key


def test_a_changed_config_is_read_again(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARPOOL_CACHE_DIR", str(tmp_path / "cache"))
    base = shutil.copytree(tiny_base, tmp_path / "base")
    assert check_spec(_spec(base, tmp_path / "none.jsonl"), "job.yaml")  # the data is missing
    kept = read_base_facts(str(base))
    assert kept is not None and "model.layers.2.self_attn.q_proj" not in kept.linear_shapes
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert "model.layers.2.self_attn.q_proj" in ValidationCache().shapes(str(base))
