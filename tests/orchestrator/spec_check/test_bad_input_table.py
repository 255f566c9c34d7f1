"""A table of malformed specs and datasets, each refused at submit before any work.

Each case goes through what `carpool submit` runs before it contacts the
controller (`validate_files`, then the operator's admission checks) and must
give a one-line problem naming its file and field (and line, for data), so
nothing is queued. A tokenizer without a pad token is handled, not an error.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.control.admission import check_admission
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.spec_check.validation import SpecValidationError, validate_files
from carpool.workers.base.tiny_base import build_tiny_base

from tests.helpers.peft_reference import save_peft_adapter
from tests.helpers.round_driver import train_to_end

Case = Callable[[dict, Path], None]


def _set(path: str, value) -> Case:
    def apply(spec: dict, root: Path) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return apply


def _dataset(content: bytes | str, fmt: str = "auto", section: str = "dataset") -> Case:
    def apply(spec: dict, root: Path) -> None:
        path = root / "data" / "bad.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        spec[section] = {"path": str(path), "format": fmt}

    return apply


def _not_a_model(spec: dict, root: Path) -> None:
    (root / "empty-dir").mkdir(exist_ok=True)
    spec["base_model"] = str(root / "empty-dir")


def _both(*cases: Case) -> Case:
    def apply(spec: dict, root: Path) -> None:
        for case in cases:
            case(spec, root)

    return apply


def _drop(path: str) -> Case:
    def apply(spec: dict, root: Path) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        del node[leaf]

    return apply


def _init_from(hidden_size: int = 64, **lora: object) -> Case:
    """An init_from adapter made by PEFT, for a tiny base of `hidden_size` (the spec's is 64)."""

    def apply(spec: dict, root: Path) -> None:
        base = Path(spec["base_model"])
        if hidden_size != 64:
            base = build_tiny_base(root / "other-base", hidden_size=hidden_size)
        adapter = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
        spec["adapter"]["init_from"] = str(save_peft_adapter(base, root / "init", **adapter))

    return apply


USER_ONLY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
TEXT_ROW = json.dumps({"text": "hello"}) + "\n"
PAIR_ROW = json.dumps({"prompt": "the cat", "chosen": " sat", "rejected": " ran"}) + "\n"
UNPAIRED_ROW = json.dumps({"prompt": "the cat", "completion": " sat", "label": True}) + "\n"


def _dpo(**objective: object) -> Case:
    """A DPO job on a preference dataset, with `objective`'s options."""

    def apply(spec: dict, root: Path) -> None:
        _dataset(PAIR_ROW * 2)(spec, root)
        spec["objective"] = {"type": "dpo", **objective}

    return apply


# (case id, change to a valid spec, field named, text the message must contain)
CASES: list[tuple[str, Case, str, str]] = [
    ("unknown-top-field", _set("colour", "red"), "colour", "unknown field"),
    ("unknown-nested-field", _set("adapter.rank", 8), "adapter.rank", "unknown field"),
    ("r-zero", _set("adapter.r", 0), "adapter.r", "greater than or equal to 1"),
    ("r-wrong-type", _set("adapter.r", "eight"), "adapter.r", "integer"),
    ("r-above-dims", _set("adapter.r", 48), "adapter.r", "v_proj"),
    ("alpha-zero", _set("adapter.lora_alpha", 0), "adapter.lora_alpha", "greater than 0"),
    ("dropout-one", _set("adapter.lora_dropout", 1.0), "adapter.lora_dropout", "less than 1"),
    ("dropout-negative", _set("adapter.lora_dropout", -0.1), "adapter.lora_dropout", "greater than or equal to 0"),
    ("target-missing", _set("adapter.target_modules", ["qkv_proj"]), "adapter.target_modules", "qkv_proj"),
    ("rank-pattern-matches-nothing", _set("adapter.rank_pattern", {"mlp.dwn_proj": 8}), "adapter.rank_pattern", "'mlp.dwn_proj' matches no targeted module"),
    ("alpha-pattern-untargeted", _set("adapter.alpha_pattern", {"down_proj": 4}), "adapter.alpha_pattern", "'down_proj' matches no targeted module"),
    ("rank-pattern-zero", _set("adapter.rank_pattern", {"q_proj": 0}), "adapter.rank_pattern", "whole number >= 1"),
    ("rank-pattern-bad-regex", _set("adapter.rank_pattern", {"q_proj(": 4}), "adapter.rank_pattern", "regular expression"),
    ("steps-and-epochs", _set("training.num_epochs", 1), "training.max_steps", "not both"),
    ("neither-steps-nor-epochs", _drop("training.max_steps"), "training.max_steps", "set one of"),
    ("batch-zero", _set("training.batch_size", 0), "training.batch_size", "greater than or equal to 1"),
    ("lr-zero", _set("training.learning_rate", 0), "training.learning_rate", "greater than 0"),
    ("lr-wrong-type", _set("training.learning_rate", "fast"), "training.learning_rate", "number"),
    ("seq-too-short", _set("training.max_seq_length", 1), "training.max_seq_length", "greater than or equal to 2"),
    ("scheduler-unknown", _set("training.lr_scheduler_type", "step"), "training.lr_scheduler_type", "constant"),
    ("save-steps-zero", _set("training.save_steps", 0), "training.save_steps", "greater than or equal to 1"),
    ("logging-steps-zero", _set("training.logging_steps", 0), "training.logging_steps", "greater than or equal to 1"),
    ("name-bad-chars", _set("name", "Bad Name!"), "name", "a-z"),
    ("name-too-long", _set("name", "a" * 65), "name", "64"),
    ("base-missing", _set("base_model", "/nonexistent/model"), "base_model", "no such"),
    ("base-not-a-model", _not_a_model, "base_model", "cannot load"),
    ("dataset-missing", _set("dataset.path", "/nonexistent/data.jsonl"), "dataset.path", "not found"),
    ("dataset-empty", _dataset(""), "dataset.path", "empty"),
    ("dataset-bad-json-line-3", _dataset(TEXT_ROW * 2 + "{not json\n"), "dataset.path", ":3:"),
    ("dataset-not-utf8", _dataset(TEXT_ROW.encode() + b'{"text": "caf\xe9"}\n'), "dataset.path", ":2:"),
    ("messages-without-assistant", _dataset(USER_ONLY), "dataset.path", "assistant"),
    ("rows-lack-format-fields", _dataset(TEXT_ROW, fmt="prompt_completion"), "dataset.path", "prompt"),
    ("format-unknown", _set("dataset.format", "csv"), "dataset.format", "text"),
    ("init-from-missing", _set("adapter.init_from", "/nonexistent/adapter"), "adapter.init_from", "adapter"),
    ("init-from-lora-bias", _init_from(lora_bias=True), "adapter.init_from", "lora_bias"),
    ("init-from-other-base", _init_from(hidden_size=128), "adapter.init_from", "lora_A is 4x128 but the base's module takes 64 inputs"),
    ("init-from-alpha-conflict", _both(_init_from(), _set("adapter.lora_alpha", 4)), "adapter.lora_alpha", "conflicts with init_from's lora_alpha 16"),
    ("eval-steps-without-eval-data", _set("training.eval_steps", 5), "training.eval_steps", "eval_dataset"),
    ("eval-steps-zero", _both(_dataset(TEXT_ROW, section="eval_dataset"), _set("training.eval_steps", 0)), "training.eval_steps", "greater than or equal to 1"),
    ("eval-data-bad-json-line-2", _dataset(TEXT_ROW + "{oops\n", section="eval_dataset"), "eval_dataset.path", ":2:"),
    ("eval-data-missing", _set("eval_dataset.path", "/nonexistent/eval.jsonl"), "eval_dataset.path", "not found"),
    ("eval-data-unknown-field", _set("eval_dataset.split", "test"), "eval_dataset.split", "unknown field"),
    ("dpo-beta-zero", _dpo(beta=0), "objective.beta", "greater than 0"),
    ("dpo-smoothing-half", _dpo(loss_type="robust", label_smoothing=0.5), "objective.label_smoothing", "less than 0.5"),
    ("dpo-smoothing-not-robust", _dpo(label_smoothing=0.1), "objective", "robust only"),
    ("dpo-loss-unknown", _dpo(loss_type="exo_pair"), "objective.loss_type", "sigmoid"),
    ("objective-unknown", _set("objective", {"type": "ppo"}), "objective", "'sft', 'dpo'"),
    ("objective-other-types-option", _set("objective", {"type": "sft", "beta": 0.1}), "objective.beta", "unknown field"),
    ("simpo-with-cpo-alpha", _set("objective", {"type": "simpo", "cpo_alpha": 1.0}), "objective.cpo_alpha", "objective simpo takes: beta, type, simpo_gamma"),
    ("orpo-beta-negative", _set("objective", {"type": "orpo", "beta": -1}), "objective.beta", "greater than 0"),
    ("cpo-alpha-negative", _set("objective", {"type": "cpo", "cpo_alpha": -0.5}), "objective.cpo_alpha", "greater than or equal to 0"),
    ("orpo-on-text-data", _set("objective", {"type": "orpo"}), "dataset.path", "objective orpo trains on preference data"),
    ("kto-on-pair-data", _both(_dataset(PAIR_ROW * 2), _set("objective", {"type": "kto"})), "dataset.path", "objective kto trains on unpaired_preference data; this dataset's format is preference"),
    ("kto-format-declared-pairs", _both(_dataset(UNPAIRED_ROW * 2, fmt="unpaired_preference"), _set("objective", {"type": "dpo"})), "dataset.format", "objective dpo trains on preference data; this dataset's format is unpaired_preference"),
    ("kto-batch-of-one", _both(_dataset(UNPAIRED_ROW * 2), _set("objective", {"type": "kto"}), _set("training.batch_size", 1)), "training.batch_size", "objective kto needs batch_size >= 2"),
    ("kto-label-not-bool", _both(_dataset(UNPAIRED_ROW + json.dumps({"prompt": "a", "completion": " b", "label": "yes"}) + "\n"), _set("objective", {"type": "kto"})), "dataset.path", ":2: field 'label' must be a boolean"),
    ("dpo-on-text-data", _set("objective", {"type": "dpo"}), "dataset.path", "objective dpo trains on preference data; this dataset's format is text"),
    ("dpo-format-declared-text", _both(_dpo(), _set("dataset.format", "text")), "dataset.format", "objective dpo trains on preference data"),
    ("sft-on-pairs", _dataset(PAIR_ROW), "dataset.path", "objective sft trains on text or prompt_completion or messages data"),
    ("pair-missing-rejected", _both(_dpo(), _dataset(PAIR_ROW + '{"prompt": "a", "chosen": " b"}\n')), "dataset.path", ":2: missing field 'rejected'"),
    ("pair-identical", _both(_dpo(), _dataset('{"prompt": "a", "chosen": " b", "rejected": " b"}\n')), "dataset.path", ":1: chosen and rejected are the same"),
]  # fmt: skip


@pytest.fixture(scope="module")
def valid_spec(tiny_base: Path, datasets: dict[str, Path]) -> dict:
    return {
        "name": "good",
        "base_model": str(tiny_base),
        "dataset": {"path": str(datasets["text"])},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 3},
    }


def test_the_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    ("change", "field", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_spec_is_refused_with_its_field(
    change: Case, field: str, text: str, valid_spec: dict, tmp_path: Path, capsys
) -> None:
    spec = copy.deepcopy(valid_spec)
    change(spec, tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecValidationError) as caught:
        validate_files([path])
    problems = caught.value.problems
    assert any(p.field == field and text in p.message for p in problems), problems
    assert all(str(path) in str(p) and "\n" not in str(p) for p in problems)
    # The CLI reports the same, exits non-zero, and never reaches a controller.
    assert main(["submit", str(path)]) == 1
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err and "no carpool" not in err


def test_valid_spec_passes(valid_spec: dict, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(valid_spec))
    assert [s.name for s in validate_files([path])] == ["good"]


@pytest.mark.parametrize(
    ("text", "where"),
    [("name: [unclosed\n", "line"), ("- a\n- list\n", "(top level)")],
    ids=["yaml-syntax", "not-a-mapping"],
)
def test_unparseable_yaml(text: str, where: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecValidationError) as caught:
        validate_files([path])
    assert any(where in p.field for p in caught.value.problems), caught.value.problems


def test_dataset_over_the_operators_cap_is_refused(valid_spec: dict, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**valid_spec, "eval_dataset": valid_spec["dataset"]}))
    specs = validate_files([path])
    with pytest.raises(SpecValidationError) as caught:
        check_admission(specs, OperatorConfig(max_dataset_bytes=10), [str(path)])
    fields = {p.field for p in caught.value.problems if "over the operator's cap" in p.message}
    assert fields == {"dataset.path", "eval_dataset.path"}


def test_tokenizer_without_pad_token_is_handled(datasets: dict[str, Path], tmp_path: Path) -> None:
    from carpool.workers.spec.job_spec import DatasetSpec, JobSpec, TrainingSpec
    from carpool.workers.training.engine import Engine
    from transformers import AutoTokenizer

    base = build_tiny_base(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token_id is None
    spec = {
        "name": "nopad",
        "base_model": str(base),
        "dataset": {"path": str(datasets["text"])},
        "training": {"max_steps": 2, "batch_size": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert validate_files([tmp_path / "job.yaml"])
    engine = Engine(str(base), device="cpu")
    config = JobSpec(
        name="nopad",
        base_model=str(base),
        dataset=DatasetSpec(path=datasets["text"]),
        training=TrainingSpec(max_steps=2, batch_size=3),
    )
    engine.add_job(config)
    assert train_to_end(engine)["nopad"].step == 2
