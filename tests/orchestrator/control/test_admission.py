"""The operator's limits on what a job may read: allowed roots and dataset size."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.control.admission import admission_problems, check_admission
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.spec_check.validation import SpecValidationError
from carpool.workers.spec.job_spec import JobSpec


def spec(base: str, data: Path, **adapter) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "j",
            "base_model": base,
            "dataset": {"path": str(data)},
            "adapter": {"r": 4, **adapter},
            "training": {"max_steps": 1},
        }
    )


def fields(problems) -> list[str]:
    return sorted(p.field for p in problems)


def test_paths_inside_the_allowed_roots_pass(tiny_base: Path, datasets: dict[str, Path]) -> None:
    config = OperatorConfig(allowed_roots=[tiny_base.parent, datasets["text"].parent])
    assert admission_problems(spec(str(tiny_base), datasets["text"]), config, "a.yaml") == []
    assert admission_problems(spec("org/model", datasets["text"]), OperatorConfig(), "a.yaml") == []


def test_paths_outside_the_roots_are_refused(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = OperatorConfig(allowed_roots=[tmp_path / "allowed"])
    (tmp_path / "allowed").mkdir()
    # A symlink inside the root that points outside it does not get through.
    link = tmp_path / "allowed" / "data.jsonl"
    link.symlink_to(datasets["text"])
    problems = admission_problems(spec(str(tiny_base), link), config, "a.yaml")
    assert fields(problems) == ["base_model", "dataset.path"]
    assert all("outside the allowed roots" in p.message for p in problems)
    # A hub id cannot be checked against a root, so it is refused when roots are set.
    hub = admission_problems(spec("org/model", link), config, "a.yaml")
    assert "must be an existing path" in next(p.message for p in hub if p.field == "base_model")


def test_dataset_over_the_size_cap(tiny_base: Path, datasets: dict[str, Path]) -> None:
    size = datasets["text"].stat().st_size
    over = OperatorConfig(max_dataset_bytes=size - 1)
    with pytest.raises(SpecValidationError, match="over the operator's cap"):
        check_admission([spec(str(tiny_base), datasets["text"])], over, ["a.yaml"])
    at_cap = OperatorConfig(max_dataset_bytes=size)
    check_admission([spec(str(tiny_base), datasets["text"])], at_cap, ["a.yaml"])
