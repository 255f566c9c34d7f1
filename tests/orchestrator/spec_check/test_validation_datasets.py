"""Validation reads a dataset file shared by several jobs once, and still reports it per job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.spec_check.validation import (
    SpecProblem,
    SpecValidationError,
    ValidationCache,
    check_spec,
    validate_files,
)
from carpool.workers.data import dataset as dataset_module

from tests.helpers.data import write_jsonl

ROWS = [{"text": "word " * 40}, {"text": "short"}, {"text": "the cat sat"}]


@pytest.fixture
def tokenized(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every record `load_dataset` tokenizes, in order."""
    seen: list[dict] = []
    real = dataset_module.tokenize_record

    def spy(record: dict, *args, **kwargs):
        seen.append(record)
        return real(record, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "tokenize_record", spy)
    return seen


def spec(base: Path, data: Path, name: str, max_seq_length: int = 16, **more: object) -> dict:
    return {
        "name": name,
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "training": {"max_steps": 2, "max_seq_length": max_seq_length},
        **more,
    }


def write_specs(tmp_path: Path, raws: list[dict]) -> list[Path]:
    paths = []
    for raw in raws:
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(path)
    return paths


def test_jobs_sharing_a_file_tokenize_it_once_and_each_gets_its_note(
    tiny_base, tmp_path, tokenized
):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    raws = [spec(tiny_base, data, f"job-{i}", eval_dataset={"path": str(data)}) for i in range(3)]
    raws.append(spec(tiny_base, data, "longer", max_seq_length=512))  # other rows: read again
    notes: list[SpecProblem] = []
    specs = validate_files(write_specs(tmp_path, raws), notes)
    assert [s.name for s in specs] == ["job-0", "job-1", "job-2", "longer"]
    assert len(tokenized) == 2 * len(ROWS)
    message = "1 of 3 rows are longer than max_seq_length=16 and will be truncated"
    assert [(Path(n.source).stem, n.field, n.message) for n in notes] == [
        (f"job-{i}", field, message)
        for i in range(3)
        for field in ("dataset.path", "eval_dataset.path")
    ]


def test_a_bad_shared_file_is_reported_for_every_job_that_uses_it(tiny_base, tmp_path, tokenized):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"prompt": "no text"}])
    paths = write_specs(tmp_path, [spec(tiny_base, data, f"job-{i}") for i in range(3)])
    with pytest.raises(SpecValidationError) as info:
        validate_files(paths)
    assert [(p.source, p.field, p.message) for p in info.value.problems] == [
        (str(path), "dataset.path", f"{data}:2: missing field 'text'") for path in paths
    ]
    assert len(tokenized) == 2  # the file was read once


def test_a_file_changed_during_a_run_is_read_again(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = ValidationCache()
    assert check_spec(spec(tiny_base, data, "a"), "a.yaml", cache=cache) == []
    write_jsonl(data, [{"prompt": "no text"}])
    os.utime(data, ns=(0, data.stat().st_mtime_ns + 1_000_000_000))
    [problem] = check_spec(spec(tiny_base, data, "b"), "b.yaml", cache=cache)
    assert problem.field == "dataset.path"
    assert problem.message.startswith(f"{data}: cannot detect the format")
