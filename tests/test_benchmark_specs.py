"""The benchmark scripts, which run outside CI: they start, and their job files are valid."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import pytest
from carpool.orchestrator.demo.run import write_datasets
from carpool.orchestrator.spec_check.validation import validate_files

from tests.helpers.benchmark_smoke import ATTACHED, BENCHMARKS, SMOKE_ARGS, run_smallest


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_orchestrator_benchmark_specs_are_valid(tiny_base: Path, tmp_path: Path) -> None:
    paths = load("orchestrator").write_specs(tmp_path, tiny_base, jobs=4, steps=3)
    assert [s.name for s in validate_files(paths)] == [f"bench-{i}" for i in range(4)]


def test_soak_specs_are_valid(tiny_base: Path, tmp_path: Path) -> None:
    soak = load("soak")
    tasks = write_datasets(tmp_path / "data")
    rng = random.Random(0)
    paths = [soak.write_spec(tmp_path, tiny_base, tasks, i, rng) for i in range(4)]
    specs = validate_files(paths)
    assert len({s.dataset.path for s in specs}) == 3  # the tasks in turn


def test_every_benchmark_has_a_smoke_run() -> None:
    """Those on Ray run in tests/orchestrator/runtime/test_benchmarks_on_ray_integration.py."""
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(SMOKE_ARGS)


@pytest.mark.integration  # a process per script
@pytest.mark.parametrize("script", sorted(set(SMOKE_ARGS) - ATTACHED))
def test_each_benchmark_runs_at_its_smallest_size_and_prints_its_verdict(script: str) -> None:
    run_smallest(script)
