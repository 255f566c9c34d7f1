"""Where `carpool train` spends its time before the first round, phase by phase.

A tiny local base, 32 one-row jobs (batch_size 1, a few steps) over 8 dataset
files of a few hundred rows (four jobs per file, in all three formats), some
with an eval file shared by several jobs. Each trial is a fresh Python process
that walks the same path as `carpool train`:

    start + exit   interpreter start-up and shutdown (wall time outside the phases)
    imports        what `carpool train` imports before it validates
    validation     `validate_files` over the 32 job files
    base load      the frozen base, then its tokenizer (`Engine.__init__`)
    admission      `Engine.add_job` per job: datasets read + tokenized,
                   adapter init, the rest (optimizer, schedule, bank)
    first round    one `run_round`

Best and median of `--trials` trials are printed per phase, then the whole
`python -m carpool train` command (every round, adapters written) once.
Last, whole commands on one tiny job (batch 2, 2 steps), `--trials` times each:
`carpool validate` with nothing kept of the base (an empty cache directory,
as on a new machine), `carpool validate` again (the base's facts kept), and
`carpool train` (adapters written).
`--profile` prints cProfile's top functions of one trial instead.

    python benchmarks/fixed_costs.py [--trials 5] [--jobs 32] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (
    "start + exit", "imports", "validation", "base load", "tokenizer load",
    "admission: datasets", "admission: adapters", "admission: rest", "first round",
)  # fmt: skip
FILES = 8
ROWS = 300
WORDS = [
    "carpool",
    "trains",
    "many",
    "small",
    "adapters",
    "on",
    "one",
    "frozen",
    "base",
    "model",
    "with",
    "fused",
    "rows",
]


def _sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}."


def _records(fmt: str, rows: int, seed: int) -> list[dict]:
    out = []
    for i in range(rows):
        a, b = _sentence(i + seed, 6 + i % 9), _sentence(i * 5 + seed, 4 + i % 7)
        if fmt == "text":
            out.append({"text": f"{a} {b}"})
        elif fmt == "prompt_completion":
            out.append({"prompt": a, "completion": b})
        else:
            out.append({"messages": [{"role": "user", "content": a},
                                     {"role": "assistant", "content": b}]})  # fmt: skip
    return out


def build_workload(root: Path, jobs: int) -> list[Path]:
    """The base, the dataset files and `jobs` job files under `root`; returns the job files."""
    import yaml
    from carpool.workers.base.tiny_base import build_tiny_base

    base = build_tiny_base(root / "base")
    formats = ("text", "prompt_completion", "messages")
    data = []
    for f in range(FILES):
        path = root / "data" / f"d{f}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = _records(formats[f % 3], ROWS, seed=f)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        data.append(path)
    eval_path = root / "data" / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in _records("text", 40, 99)))
    specs = []
    for i in range(jobs):
        spec = {
            "name": f"job-{i}",
            "base_model": str(base),
            "dataset": {"path": str(data[i % FILES])},
            "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 3, "batch_size": 1, "learning_rate": 1e-3, "seed": i,
                         "max_seq_length": 64},
        }  # fmt: skip
        if i % 4 == 0:
            spec["eval_dataset"] = {"path": str(eval_path), "format": "text"}
        path = root / "jobs" / f"job{i}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        specs.append(path)
    return specs


def _timed(totals: dict[str, float], phase: str, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - started

    return wrapper


def trial(specs: list[Path], out: Path) -> dict[str, float]:
    """One pass down `carpool train`'s path, seconds per phase (run in a fresh process)."""
    times = dict.fromkeys(PHASES, 0.0)
    started = time.perf_counter()
    # What `carpool train` imports before it validates: the CLI, then cmd_train's imports.
    import carpool.orchestrator.cli.main  # noqa: F401
    from carpool.orchestrator.cli.local_train import train_locally  # noqa: F401
    from carpool.orchestrator.cli.progress import JobProgress  # noqa: F401
    from carpool.orchestrator.spec_check.validation import validate_files
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    times["imports"] = time.perf_counter() - started

    started = time.perf_counter()
    configs = validate_files(specs)
    times["validation"] = time.perf_counter() - started

    import carpool.workers.training.engine as engine_module
    from carpool.workers.training.rounds import LocalOutputs, run_round

    engine_module.load_base = _timed(times, "base load", engine_module.load_base)
    engine_module.load_tokenizer = _timed(times, "tokenizer load", engine_module.load_tokenizer)
    engine = engine_module.Engine(configs[0].base_model, device="cpu")
    engine._load = _timed(times, "admission: datasets", engine._load)
    engine._initial_adapter = _timed(times, "admission: adapters", engine._initial_adapter)
    started = time.perf_counter()
    for config in configs:
        engine.add_job(config)
    admitted = time.perf_counter() - started
    times["admission: rest"] = (
        admitted - times["admission: datasets"] - times["admission: adapters"]
    )

    started = time.perf_counter()
    run_round(engine, LocalOutputs(out, None))
    times["first round"] = time.perf_counter() - started
    return times


def _child(root: Path) -> None:
    specs = sorted((root / "jobs").glob("*.yaml"), key=lambda p: int(p.stem[3:]))
    with tempfile.TemporaryDirectory() as out:
        print(json.dumps(trial(specs, Path(out))))


def _run_trial(root: Path) -> dict[str, float]:
    # Nothing kept of the base (`base_facts`), as on a new machine: every trial alike.
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(root)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "CARPOOL_CACHE_DIR": cache},
        )
    wall = time.perf_counter() - started
    times = json.loads(done.stdout.strip().splitlines()[-1])
    times["start + exit"] = wall - sum(times.values())
    times["total"] = wall
    return times


def _profile(root: Path, top: int) -> None:
    command = [sys.executable, "-m", "cProfile", "-s", "cumulative", __file__, "--child", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[: start + top + 1]))


def _whole_command(root: Path, specs: list[Path]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "carpool", "train", *map(str, specs), "--out", out,
                   "--device", "cpu"]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, text=True, check=True)
        return time.perf_counter() - started


def _one_job_commands(root: Path, spec: Path, trials: int) -> dict[str, list[float]]:
    """Seconds of each whole command on one tiny job, `trials` times, in turn."""
    import yaml

    job = yaml.safe_load(spec.read_text())
    job.pop("eval_dataset", None)
    job["training"].update(max_steps=2, batch_size=2)
    tiny = root / "tiny-job.yaml"
    tiny.write_text(yaml.safe_dump(job))
    carpool = [sys.executable, "-m", "carpool"]
    times: dict[str, list[float]] = {"validate, nothing kept": [], "validate, facts kept": [],
                                     "train, 2 steps": []}  # fmt: skip
    for trial in range(trials):
        cache = root / f"cache-{trial}"
        steps = [("validate, nothing kept", ["validate", str(tiny)]),
                 ("validate, facts kept", ["validate", str(tiny)]),
                 ("train, 2 steps", ["train", str(tiny), "--out", str(root / f"out-{trial}"),
                                     "--device", "cpu"])]  # fmt: skip
        for name, argv in steps:
            started = time.perf_counter()
            env = {**os.environ, "CARPOOL_CACHE_DIR": str(cache)}
            subprocess.run([*carpool, *argv], capture_output=True, check=True, env=env)
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="cProfile one trial instead")
    parser.add_argument("--top", type=int, default=40, help="functions shown with --profile")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["CARPOOL_CACHE_DIR"] = str(root / "cache")  # the user's cache untouched
        specs = build_workload(root, args.jobs)
        if args.profile:
            _profile(root, args.top)
            return
        runs = [_run_trial(root) for _ in range(args.trials)]
        print(f"jobs={args.jobs} files={FILES} rows/file={ROWS} device=cpu trials={args.trials}")
        print(f"{'phase':<22}{'best s':>9}{'median s':>10}")
        for phase in (*PHASES, "total"):
            values = [r[phase] for r in runs]
            print(f"{phase:<22}{min(values):>9.3f}{statistics.median(values):>10.3f}")
        whole = _whole_command(root, specs)
        print(f"whole `python -m carpool train` (every round, adapters written): {whole:.3f} s")
        commands = _one_job_commands(root, specs[0], args.trials)
        print(f"{'one tiny job, command':<26}{'best s':>9}{'median s':>10}")
        for name, values in commands.items():
            print(f"{name:<26}{min(values):>9.3f}{statistics.median(values):>10.3f}")


if __name__ == "__main__":
    main()
