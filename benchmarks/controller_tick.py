"""The controller's own time per round against the length of the queue.

One job runs in the only group slot (a fake group whose rounds return at once,
as in tests/orchestrator/control/test_controller.py), while 0, 1,000 or 10,000 jobs wait that cannot
be placed: the group is full (one adapter per group), no slot is free, and they
rank below the running job, so none may preempt it. Each tick is then the
controller's own work: reading the queue, planning, recording the round.

Trials interleave the queue lengths (0, 1k, 10k, 0, 1k, 10k, ...); each
length's figure is its best trial's mean tick. Target: flat, 10k within 10% of 0.
After each trial one more such job is submitted through another connection and
the next tick timed alone: a tick that must plan again (best of the trials).

    python benchmarks/controller_tick.py [--ticks 2000] [--trials 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from carpool.orchestrator.control.controller import Controller
from carpool.orchestrator.control.engine_worker import JobAdmitted
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.rounds import JobRoundResult

WAITING = (0, 1_000, 10_000)


class InstantGroup:
    """A worker group whose rounds take no time: each job advances one step."""

    def __init__(
        self, group_id: str, base_model: str, quantization: QuantizationSpec | None
    ) -> None:
        self.group_id, self.base_model = group_id, base_model
        self.steps: dict[str, int] = {}

    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None) -> JobAdmitted:
        self.steps[job_id] = 0
        return JobAdmitted(0, ())

    def remove_job(self, job_id: str, checkpoint: bool) -> str | None:
        self.steps.pop(job_id)
        return None

    def start_round(self) -> None:
        pass

    def finish_round(self) -> list[JobRoundResult]:
        results = []
        for job_id in self.steps:
            self.steps[job_id] += 1
            step = self.steps[job_id]
            results.append(
                JobRoundResult(
                    job=job_id, step=step, total_steps=10**9, loss=1.0, tokens_per_second=1e3,
                    tokens=64, tokens_seen=64 * step, learning_rate=1e-3, grad_norm=1.0,
                    checkpoint=None, adapter=None, eval_loss=None,
                )
            )  # fmt: skip
        return results

    def shutdown(self) -> None:
        pass


class NoCheckpoints:
    def delete_checkpoints(self, job_id: str) -> None:
        pass


def spec(base: Path, name: str, priority: int) -> dict:
    # Only the controller reads it (no worker trains it): the dataset is just a name.
    return JobSpec.model_validate(
        {
            "name": name,
            "base_model": str(base),
            "dataset": {"path": f"{name}.jsonl"},
            "training": {"max_steps": 10**9, "batch_size": 2, "max_seq_length": 32},
            "priority": priority,
        }
    ).model_dump(mode="json")


def make_controller(root: Path, base: Path, waiting: int) -> Controller:
    """A controller running one job in its only slot, with `waiting` jobs it cannot place."""
    queue = JobQueue(root / f"queue-{waiting}.sqlite")
    config = OperatorConfig.model_validate({"max_adapters_per_group": 1})
    controller = Controller(
        queue,
        config,
        InstantGroup,
        free_group_slots=lambda running: max(0, 1 - running),
        checkpoints=NoCheckpoints(),
    )
    queue.submit([("runner", spec(base, "runner", 1), str(base), 1)])
    controller.tick()  # the runner takes the slot
    template = spec(base, "waiter", 0)
    queue.submit([(f"waiter-{i}", template, str(base), 0) for i in range(waiting)])
    controller.tick()  # first sight of the waiters: their specs are parsed once here
    return controller


def mean_tick_s(controller: Controller, ticks: int) -> float:
    started = time.perf_counter()
    for _ in range(ticks):
        controller.tick()
    return (time.perf_counter() - started) / ticks


def replan_tick_s(controller: Controller, base: Path) -> float:
    """One tick after a job that cannot be placed either arrives: the scheduler runs again."""
    with JobQueue(controller.queue.path) as cli:  # as `carpool submit` would, from outside
        cli.submit([("late", spec(base, "late", 0), str(base), 0)])
    started = time.perf_counter()
    controller.tick()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ticks", type=int, default=2000, help="ticks per trial")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(root / "base")
        controllers = {n: make_controller(root, base, n) for n in WAITING}
        best = dict.fromkeys(WAITING, float("inf"))
        replan = dict.fromkeys(WAITING, float("inf"))
        for _ in range(args.trials):
            for n in WAITING:
                best[n] = min(best[n], mean_tick_s(controllers[n], args.ticks))
                replan[n] = min(replan[n], replan_tick_s(controllers[n], base))
        for c in controllers.values():
            c.queue.close()

    print(f"controller tick, best of {args.trials} trials of {args.ticks} ticks")
    print(
        f"{'jobs waiting':>12} | {'ms per tick':>11} | {'vs 0':>6} | {'tick after a submit, ms':>23}"
    )
    for n in WAITING:
        print(
            f"{n:>12,} | {best[n] * 1e3:>11.3f} | {best[n] / best[0]:>5.2f}x"
            f" | {replan[n] * 1e3:>23.3f}"
        )


if __name__ == "__main__":
    main()
