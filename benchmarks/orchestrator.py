"""The queue path against `carpool train`, on the same K jobs, in one run.

(a) `carpool train`: the jobs fused in this process (no Ray, no queue);
(b) the queue: `carpool up`, submit, the controller and a worker actor train
    the same jobs fused, until every job has succeeded.

Training time runs from the moment every job has done its first step to the
moment the last one finishes, so model loading and actor start-up are not in
it; those are printed separately as start-up costs. Target: (b) adds at most
15% to the training time.

Both paths train with the same number of torch threads (`--threads`, the
worker's `cpus_per_rank`). On a 2-core machine the default of 1 leaves a core
for Ray's own processes; with 2, they compete with the training threads.

    python benchmarks/orchestrator.py [--jobs 4] [--steps 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from carpool.orchestrator.cli.local_train import train_locally
from carpool.orchestrator.cli.progress import JobProgressRow
from carpool.orchestrator.demo.run import write_datasets
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.spec_check.validation import validate_files
from carpool.workers.base.tiny_base import build_tiny_base


def write_specs(root: Path, base: Path, jobs: int, steps: int) -> list[Path]:
    data = write_datasets(root / "data")
    paths = []
    for i in range(jobs):
        spec = {
            "name": f"bench-{i}",
            "base_model": str(base),
            "dataset": {"path": str(list(data.values())[i % len(data)].train)},
            "adapter": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-3,
                         "seed": i, "save_steps": 100, "max_seq_length": 64},
        }  # fmt: skip
        path = root / f"job{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(path)
    return paths


def run_local(specs: list[Path], out: Path) -> tuple[float, float]:
    """(start-up seconds, training seconds) of `carpool train`."""
    started = time.perf_counter()
    first_step: dict[str, float] = {}
    done: dict[str, float] = {}

    def on_progress(row: JobProgressRow) -> None:
        now = time.perf_counter()
        if row.step >= 1:
            first_step.setdefault(row.name, now)
        if row.state == "done":
            done[row.name] = now

    train_locally(validate_files(specs), out, on_progress=on_progress, device="cpu")
    all_running = max(first_step.values())
    return all_running - started, max(done.values()) - all_running


def run_queue(
    specs: list[Path], state: Path, threads: int, address: str | None = None
) -> tuple[float, float, float]:
    """(`carpool up` seconds, submit-to-all-running seconds, training seconds)."""
    state.mkdir(parents=True, exist_ok=True)
    config = state / "operator.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "cpus_per_rank": threads}))
    t0 = time.perf_counter()
    client = Client.up(config, address=address, num_cpus=2)
    t_up = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        ids = client.submit(specs)
        all_running = None
        while True:
            records = client.status()
            now = time.perf_counter()
            if all_running is None and all(r["step"] >= 1 for r in records):
                all_running = now
            if all(r["state"] == "succeeded" for r in records):
                break
            if any(r["state"] in ("failed", "cancelled") for r in records):
                raise RuntimeError(f"a job did not succeed: {records}")
            time.sleep(0.2)
        assert len(ids) == len(records)
        return t_up, all_running - t1, now - all_running
    finally:
        client.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both paths")
    parser.add_argument(
        "--address", default=None,
        help="a running Ray to use (default: start one; then `carpool up` counts its start)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(root / "base", hidden_size=128, intermediate_size=256)
        specs = write_specs(root, base, args.jobs, args.steps)
        # carpool train before and after the queue run: the machine's drift shows,
        # and the queue is compared with their mean.
        before = run_local(specs, root / "local-before")
        up, queue_start, queue_train = run_queue(specs, root / "state", args.threads, args.address)
        after = run_local(specs, root / "local-after")
        local_start = (before[0] + after[0]) / 2
        local_train = (before[1] + after[1]) / 2
    print(
        f"jobs={args.jobs} steps={args.steps} threads={args.threads} "
        "(tiny Llama, hidden 128, CPU, fused)"
    )
    print(f"{'path':<16}{'start-up s':>12}{'training s':>12}")
    print(
        f"{'carpool train':<16}{local_start:>12.2f}{local_train:>12.2f}   "
        f"(mean of {before[1]:.2f} before and {after[1]:.2f} after)"
    )
    print(f"{'queue':<16}{queue_start:>12.2f}{queue_train:>12.2f}   (+ carpool up {up:.2f}s)")
    print(f"queue training time / carpool train: {queue_train / local_train:.3f}x")


if __name__ == "__main__":
    main()
