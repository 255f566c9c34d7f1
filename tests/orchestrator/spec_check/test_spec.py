"""Job specs: schema, path resolution, one-pass validation and `carpool validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.spec_check.validation import (
    SpecProblem,
    SpecValidationError,
    check_spec,
    load_spec_file,
    validate_files,
)
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.spec.job_spec import DatasetSpec, JobSpec

from tests.helpers.peft_reference import save_peft_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", [{"text": "hello world"}, {"text": "the cat"}])


def minimal(base: Path, data: Path, **overrides: object) -> dict:
    raw: dict = {
        "name": "job-1",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "training": {"max_steps": 10},
    }
    raw.update(overrides)
    return raw


def write_spec(path: Path, raw: object) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fields(problems: list[SpecProblem]) -> list[str]:
    return [p.field for p in problems]


def test_full_spec_loads_every_field(base: Path, data: Path, tmp_path: Path) -> None:
    targets = ["q_proj", "k_proj", "v_proj"]
    init = save_peft_adapter(
        base, tmp_path / "init", r=4, lora_alpha=8, target_modules=targets, use_rslora=True
    )
    raw = minimal(base, data, priority=3)
    raw["dataset"]["format"] = "text"
    raw["adapter"] = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "use_rslora": True,
        "loraplus_lr_ratio": 16,
        "freeze_lora_A": True,
        "init_from": str(init),
    }
    raw["training"].update(
        batch_size=2,
        learning_rate="1e-4",  # PyYAML reads 1e-4 (no dot) as a string; pydantic parses it
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=1.0,
        max_seq_length=64,
        shuffle=False,
        seed=7,
        save_steps=5,
        eval_steps=4,
    )
    raw["eval_dataset"] = {"path": str(data), "format": "text"}
    spec = load_spec_file(write_spec(tmp_path / "job.yaml", raw))
    config = spec  # what the engine trains
    assert config.name == "job-1" and config.priority == 3
    assert config.dataset.path == data and config.dataset.format == "text"
    assert config.adapter.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert config.adapter.init_from == init and config.adapter.use_rslora
    assert config.adapter.loraplus_lr_ratio == 16 and config.adapter.freeze_lora_A
    assert config.training.learning_rate == 1e-4
    assert config.training.lr_scheduler_type == "cosine"
    assert config.training.max_grad_norm == 1.0 and config.training.seed == 7
    assert config.training.eval_steps == 4
    assert config.eval_dataset == DatasetSpec(path=data, format="text")


def test_defaults(base: Path, data: Path) -> None:
    spec = JobSpec.model_validate(minimal(base, data))
    config = spec
    assert config.dataset.format == "auto"
    assert config.adapter.r == 8 and config.adapter.lora_alpha == 16
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.adapter.init_from is None and config.adapter.loraplus_lr_ratio is None
    t = config.training
    assert (t.max_steps, t.num_epochs, t.batch_size, t.learning_rate) == (10, None, 8, 2e-4)
    assert (t.lr_scheduler_type, t.max_seq_length, t.shuffle, t.save_steps) == (
        "constant",
        512,
        True,
        50,
    )
    assert config.priority == 0
    assert config.eval_dataset is None and t.eval_steps is None
    assert check_spec(spec, "mem") == []


def test_all_linear_stays_a_string(base: Path, data: Path) -> None:
    spec = JobSpec.model_validate(minimal(base, data, adapter={"target_modules": "all-linear"}))
    assert spec.adapter.target_modules == "all-linear"
    assert check_spec(spec, "mem") == []


def test_paths_resolve_relative_to_yaml(base: Path, tmp_path: Path, monkeypatch) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "data").mkdir(parents=True)
    write_jsonl(jobs / "data" / "d.jsonl", [{"text": "hi"}])
    save_peft_adapter(base, jobs / "init", r=8, target_modules=["q_proj", "v_proj"])
    (jobs / "models").mkdir()
    (jobs / "models" / "tiny").symlink_to(base, target_is_directory=True)
    raw = {
        "name": "rel",
        "base_model": "models/tiny",
        "dataset": {"path": "data/d.jsonl"},
        "eval_dataset": {"path": "data/d.jsonl"},
        "adapter": {"init_from": "init"},
        "training": {"num_epochs": 1},
    }
    monkeypatch.chdir(tmp_path)  # the YAML's folder, not the cwd, anchors the paths
    spec = load_spec_file(write_spec(jobs / "job.yaml", raw))
    assert Path(spec.base_model) == jobs.resolve() / "models" / "tiny"
    assert spec.dataset.path == (jobs / "data" / "d.jsonl").resolve()
    assert spec.eval_dataset.path == (jobs / "data" / "d.jsonl").resolve()
    assert spec.adapter.init_from == (jobs / "init").resolve()


def test_base_model_kept_when_not_relative_to_yaml(base: Path, data: Path, tmp_path: Path) -> None:
    from carpool.orchestrator.spec_check.spec_paths import resolve_spec_paths

    raw = resolve_spec_paths({"base_model": "org/some-model"}, tmp_path)
    assert raw["base_model"] == "org/some-model"  # a hub id passes through
    raw = resolve_spec_paths({"base_model": str(base)}, tmp_path)
    assert raw["base_model"] == str(base)


def test_many_errors_reported_at_once(tmp_path: Path) -> None:
    raw = {
        "name": "Bad Name!",
        "base_model": str(tmp_path / "no-such-base"),
        "colour": "blue",
        "dataset": {"path": str(tmp_path / "missing.jsonl"), "fromat": "text"},
        "adapter": {"r": 0, "lora_alpha": 0, "lora_dropout": 1.0},
        "training": {"max_steps": 5, "num_epochs": 1, "batch_size": 0, "learning_rate": 0},
    }
    path = write_spec(tmp_path / "bad.yaml", raw)
    with pytest.raises(SpecValidationError) as info:
        load_spec_file(path)
    problems = info.value.problems
    got = fields(problems)
    for field in [
        "name",
        "colour",
        "dataset.fromat",
        "adapter.r",
        "adapter.lora_alpha",
        "adapter.lora_dropout",
        "training.max_steps",
        "training.batch_size",
        "training.learning_rate",
        "base_model",
        "dataset.path",
    ]:
        assert field in got, (field, [str(p) for p in problems])
    assert len(got) == 11, [str(p) for p in problems]
    assert all(p.source == str(path) for p in problems)
    text = str(info.value)
    assert len(text.splitlines()) == len(problems)
    assert f"{path}: adapter.r: " in text
    assert "did you mean 'format'" in text
    assert "not both" in text


def test_neither_steps_nor_epochs(base: Path, data: Path) -> None:
    raw = minimal(base, data, training={"batch_size": 2})
    problems = check_spec(raw, "mem")
    assert fields(problems) == ["training.max_steps"]
    assert "num_epochs" in problems[0].message


def test_rules_across_fields_are_reported_beside_the_fields_errors(base: Path, data: Path) -> None:
    training = {"max_steps": 2, "num_epochs": 1, "eval_steps": 5, "batch_size": 0}
    problems = check_spec(minimal(base, data, training=training, priority="high"), "mem")
    assert fields(problems) == [
        "training.batch_size",
        "priority",
        "training.max_steps",
        "training.eval_steps",
    ]
    assert "not both" in problems[2].message and "eval_dataset" in problems[3].message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nadapter:\n  r: [1, 2\n")
    with pytest.raises(SpecValidationError) as info:
        load_spec_file(path)
    assert fields(info.value.problems)[0].startswith("line ")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecValidationError) as info:
        load_spec_file(write_spec(tmp_path / "list.yaml", [1, 2]))
    assert "mapping" in info.value.problems[0].message


def test_missing_target_module(base: Path, data: Path) -> None:
    raw = minimal(base, data, adapter={"target_modules": ["q_proj", "qkv_proj"]})
    problems = check_spec(raw, "mem")
    assert fields(problems) == ["adapter.target_modules"]
    assert "'qkv_proj'" in problems[0].message and "v_proj" in problems[0].message


def test_rank_bounded_by_module_dims(base: Path, data: Path) -> None:
    # Tiny base: hidden 64, two kv heads of 16 -> k/v projections are 64 -> 32.
    too_big = check_spec(minimal(base, data, adapter={"r": 48, "target_modules": ["v_proj"]}), "m")
    assert fields(too_big) == ["adapter.r"] and "v_proj" in too_big[0].message
    fits = check_spec(minimal(base, data, adapter={"r": 48, "target_modules": ["q_proj"]}), "m")
    assert fits == []


def test_empty_dataset(base: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    problems = check_spec(minimal(base, empty), "mem")
    assert fields(problems) == ["dataset.path"]
    assert str(empty) in problems[0].message and "empty" in problems[0].message


def test_rows_lacking_format_fields(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    raw = minimal(base, data)
    raw["dataset"]["format"] = "prompt_completion"
    problems = check_spec(raw, "mem")
    assert fields(problems) == ["dataset.path"]
    assert f"{data}:2:" in problems[0].message  # file and line of the bad row


def test_init_from_needs_adapter_config(base: Path, data: Path, tmp_path: Path) -> None:
    problems = check_spec(minimal(base, data, adapter={"init_from": str(tmp_path)}), "mem")
    assert fields(problems) == ["adapter.init_from"]
    assert "adapter_config.json" in problems[0].message


def test_duplicate_names_across_files(base: Path, data: Path, tmp_path: Path) -> None:
    a = write_spec(tmp_path / "a.yaml", minimal(base, data))
    b = write_spec(tmp_path / "b.yaml", minimal(base, data))
    with pytest.raises(SpecValidationError) as info:
        validate_files([a, b])
    [problem] = info.value.problems
    assert (problem.source, problem.field) == (str(b), "name") and str(a) in problem.message


def test_validate_files_collects_problems_of_every_file(base: Path, data: Path, tmp_path: Path):
    a = write_spec(tmp_path / "a.yaml", minimal(base, data, adapter={"r": 0}))
    b = write_spec(tmp_path / "b.yaml", minimal(base, data, name="other", priority="high"))
    with pytest.raises(SpecValidationError) as info:
        validate_files([a, b])
    assert [(p.source, p.field) for p in info.value.problems] == [
        (str(a), "adapter.r"),
        (str(b), "priority"),
    ]


def test_cli_validate_ok(base: Path, data: Path, tmp_path: Path, capsys) -> None:
    a = write_spec(tmp_path / "a.yaml", minimal(base, data))
    b = write_spec(tmp_path / "b.yaml", minimal(base, data, name="job-2"))
    assert main(["validate", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok: job-1 ({a})", f"ok: job-2 ({b})"]


def test_rows_that_will_be_truncated_are_noted_not_refused(
    base: Path, tmp_path: Path, capsys
) -> None:
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 40}, {"text": "short"}])
    raw = minimal(base, long, eval_dataset={"path": str(long)})
    raw["training"]["max_seq_length"] = 16
    path = write_spec(tmp_path / "job.yaml", raw)
    notes: list[SpecProblem] = []
    assert [s.name for s in validate_files([path], notes)] == ["job-1"]
    message = "1 of 2 rows are longer than max_seq_length=16 and will be truncated"
    assert [(n.field, n.message) for n in notes] == [
        ("dataset.path", message),
        ("eval_dataset.path", message),
    ]
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok: job-1 ({path})", f"note: {notes[0]}", f"note: {notes[1]}"]


def test_cli_validate_reports_problems(base: Path, data: Path, tmp_path: Path, capsys) -> None:
    bad = write_spec(tmp_path / "bad.yaml", minimal(base, data, adapter={"r": 0, "x": 1}))
    assert main(["validate", str(bad), str(tmp_path / "absent.yaml")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith(f"{bad}: adapter.r: ")
    assert lines[1].startswith(f"{bad}: adapter.x: unknown field")
    assert lines[2].startswith(f"{tmp_path / 'absent.yaml'}: ")
    assert "Traceback" not in captured.err


def test_schema_failure_still_checks_base_and_data(base: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw = minimal(base, empty, priority="high", adapter={"r": 48, "target_modules": ["v_proj"]})
    problems = check_spec(raw, "mem")
    assert fields(problems) == ["priority", "adapter.r", "dataset.path"]


def test_validation_error_pickles() -> None:
    import pickle

    error = SpecValidationError([SpecProblem("a.yaml", "adapter.r", "too small")])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == "a.yaml: adapter.r: too small"


def test_repeated_keys_are_refused_with_their_lines(
    base: Path, data: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(
        f"name: job-1\nbase_model: {base}\ndataset:\n  path: {data}\n"
        "adapter:\n  r: 4\n  r: 0\ntraining:\n  max_steps: 3\nname: job-2\n"
    )
    assert main(["validate", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    # Both repeats, in file order, and the rest of the file is still checked.
    assert lines == [
        f"{path}: line 7: duplicate key 'r' (first on line 6)",
        f"{path}: line 10: duplicate key 'name' (first on line 1)",
        f"{path}: adapter.r: Input should be greater than or equal to 1 (got 0)",
    ]


def test_a_repeat_alone_refuses_an_otherwise_valid_file(
    base: Path, data: Path, tmp_path: Path
) -> None:
    path = write_spec(tmp_path / "a.yaml", minimal(base, data))
    first = len(path.read_text().splitlines()) + 1
    path.write_text(path.read_text() + "priority: 1\npriority: 2\n")
    with pytest.raises(SpecValidationError) as info:
        validate_files([path])
    assert [str(p) for p in info.value.problems] == [
        f"{path}: line {first + 1}: duplicate key 'priority' (first on line {first})"
    ]
