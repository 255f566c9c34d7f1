"""Train an engine's jobs to the end through the round function, keeping what finished.

A finished job leaves the engine (`run_round`); tests that compare its adapter
or state afterwards read it from `KeepFinished`.
"""

from __future__ import annotations

from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import run_round
from carpool.workers.training.training_job import TrainingJob


class KeepFinished:
    """`JobOutputs` that keep each finished job in memory and take no checkpoints."""

    def __init__(self) -> None:
        self.jobs: dict[str, TrainingJob] = {}

    def save_checkpoint(self, job: TrainingJob) -> None:
        return None

    def export_adapter(self, job: TrainingJob) -> str:
        self.jobs[job.name] = job
        return job.name


def train_to_end(
    engine: Engine, outputs: KeepFinished | None = None, max_rounds: int | None = None
) -> dict[str, TrainingJob]:
    """Rounds until no job is left to train (or `max_rounds`); the finished jobs by name."""
    outputs = outputs if outputs is not None else KeepFinished()
    rounds = 0
    while engine.active_jobs() and (max_rounds is None or rounds < max_rounds):
        run_round(engine, outputs)
        rounds += 1
    return outputs.jobs
