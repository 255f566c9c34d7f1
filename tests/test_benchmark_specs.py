"""The queue benchmarks' job files pass carpool's own validation (they run outside CI)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

from orchestrator.demo import write_datasets
from orchestrator.validation import validate_files

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
