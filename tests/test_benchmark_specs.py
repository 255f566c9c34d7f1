"""The benchmark scripts, which run outside CI: they start, and their job files are valid."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from carpool.orchestrator.demo.run import write_datasets
from carpool.orchestrator.spec_check.validation import validate_files

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


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


@pytest.mark.integration  # a process per script
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_each_benchmark_runs_as_a_script(script: str) -> None:
    """Run as scripts, their folder leads sys.path: no file there may shadow a package."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
