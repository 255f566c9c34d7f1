"""The benchmark scripts, which run outside CI: they start, and their job files are valid."""

from __future__ import annotations

import importlib.util
import random
import re
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


# Each script's smallest run: it must complete and print its ratio, so that no benchmark
# rots unnoticed (the figures themselves are BENCHMARKS.md's, measured by hand).
SMOKE_ARGS: dict[str, list[str]] = {
    "after_training.py": ["--adapters", "2", "--rows", "4", "--prompts", "2", "--new-tokens", "2",
                          "--batch-rows", "4", "--hidden", "32", "--layers", "1", "--repeats", "1"],
    "client_lookup.py": ["--trials", "1"],
    "controller_tick.py": ["--ticks", "5", "--trials", "1"],
    "engine.py": ["--jobs", "2", "--rows", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                  "--trials", "1"],
    "engine_sweep.py": ["--jobs", "1", "--rows", "1", "--lengths", "fixed", "--seq", "16", "--",
                        "--steps", "1", "--warmup", "0", "--trials", "1"],
    "fixed_costs.py": ["--trials", "1", "--jobs", "1"],
    "groups.py": ["--jobs", "1", "--steps", "1"],
    "orchestrator.py": ["--jobs", "1", "--steps", "2"],
    "preference.py": ["--jobs", "1", "--steps", "1", "--pairs", "2"],
    "serve.py": ["--adapters", "2", "--requests", "4", "--concurrency", "2", "--new-tokens", "2",
                 "--hidden", "32", "--layers", "1"],
    "shared_reference.py": ["--jobs", "2", "--pairs", "4", "--epochs", "1", "--batch", "2",
                            "--trials", "1"],
    "soak.py": ["--minutes", "0.02", "--submit-every", "1", "--kill-every", "1000",
                "--drain-minutes", "2"],
    "sweep.py": ["--steps", "4", "--eval-steps", "2", "--concurrent", "2", "--hidden", "32",
                 "--layers", "1"],
}  # fmt: skip
# Scripts that take `--address`: their smoke runs use the suite's Ray head (the soak's
# smoke run kills nothing).
ATTACHED = {"orchestrator.py", "serve.py", "soak.py"}
RATIO = re.compile(r"\d\.\d+x")
# The scripts whose verdict is not a ratio: what they print instead.
VERDICT = {"fixed_costs.py": re.compile(r"^total +\d", re.M), "soak.py": re.compile(r'"lost": 0\b')}


def test_every_benchmark_has_a_smoke_run() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(SMOKE_ARGS)


@pytest.mark.integration  # a process per script
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_each_benchmark_runs_at_its_smallest_size_and_prints_its_verdict(
    script: str, request: pytest.FixtureRequest
) -> None:
    """Run as scripts, their folder leads sys.path: no file there may shadow a package."""
    extra = []
    if script in ATTACHED:  # on the suite's Ray head: no head of its own to start
        extra = ["--address", request.getfixturevalue("shared_ray_head")]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *SMOKE_ARGS.get(script, []), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert VERDICT.get(script, RATIO).search(done.stdout), done.stdout[-2000:]
