"""A bounded soak: a stream of jobs while worker processes are killed at random.

Starts carpool on a local Ray head, submits a job every `--submit-every`
seconds for `--minutes`, SIGKILLs a random worker rank every `--kill-every`
seconds, then waits for every job to finish and prints jobs submitted,
completed, failed by their own fault, failed for lack of attempts, and lost
(submitted but missing or never final). Exits 1 if any job was lost.

    python benchmarks/soak.py [--minutes 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml
from carpool.orchestrator.demo.run import TaskData, write_datasets
from carpool.orchestrator.runtime.client import Client
from carpool.workers.base.tiny_base import build_tiny_base

FINAL = {"succeeded", "failed", "cancelled"}


def worker_pids() -> list[int]:
    import ray
    from carpool.orchestrator.runtime.actor_names import NAMESPACE

    pids = []
    for info in ray.util.list_named_actors(all_namespaces=True):
        if re.search(r"-rank-\d+$", info["name"]):
            try:
                actor = ray.get_actor(info["name"], namespace=NAMESPACE)
                pids.append(ray.get(actor.pid.remote(), timeout=5))
            except Exception:  # already dead or going
                continue
    return pids


def write_spec(
    root: Path, base: Path, tasks: dict[str, TaskData], i: int, rng: random.Random
) -> Path:
    """The i-th job of the stream: the tasks' training sets in turn, random sizes."""
    data = list(tasks.values())[i % len(tasks)].train
    spec = {
        "name": f"soak-{i}",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "adapter": {"r": rng.choice([2, 4, 8]), "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": rng.randint(100, 400), "batch_size": rng.randint(1, 4),
                     "learning_rate": 1e-3, "save_steps": 10, "seed": i},
        "priority": rng.randint(0, 2),
    }  # fmt: skip
    path = root / f"soak-{i}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--submit-every", type=float, default=2.0)
    parser.add_argument("--kill-every", type=float, default=15.0)
    parser.add_argument("--drain-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None, help="a running Ray to use (default: start one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(root / "base")
        data = write_datasets(root / "data")
        state = root / "state"
        config = root / "operator.yaml"
        config.write_text(
            yaml.safe_dump({"state_dir": str(state), "max_attempts": 20, "poll_interval_s": 0.05})
        )
        client = Client.up(config, address=args.address, num_cpus=2)
        submitted, kills = [], 0
        try:
            end = time.monotonic() + args.minutes * 60
            next_kill = time.monotonic() + args.kill_every
            i = 0
            while time.monotonic() < end:
                spec = write_spec(root, base, data, i, rng)
                submitted += client.submit([spec])
                i += 1
                if time.monotonic() >= next_kill:
                    pids = worker_pids()
                    if pids:  # no live rank now (groups stop when idle): try again soon
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                        next_kill = time.monotonic() + args.kill_every
                time.sleep(args.submit_every)
            deadline = time.monotonic() + args.drain_minutes * 60
            while time.monotonic() < deadline:
                records = {r["id"]: r for r in client.status()}
                if all(records.get(j, {}).get("state") in FINAL for j in submitted):
                    break
                time.sleep(1.0)
            records = {r["id"]: r for r in client.status()}
        finally:
            client.down()
    states = [records.get(j, {}).get("state") for j in submitted]
    out_of_attempts = [
        j for j in submitted
        if records.get(j, {}).get("state") == "failed" and "attempts" in (records[j]["error"] or "")
    ]  # fmt: skip
    summary = {
        "minutes": args.minutes,
        "workers_killed": kills,
        "submitted": len(submitted),
        "completed": states.count("succeeded"),
        "failed_own_fault": states.count("failed") - len(out_of_attempts),
        "failed_out_of_attempts": len(out_of_attempts),
        "lost": sum(1 for s in states if s not in FINAL),
    }
    print(json.dumps(summary, indent=2))
    return 1 if summary["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
