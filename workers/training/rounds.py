"""One round of an engine with its bookkeeping: what `carpool train` and a worker both run.

A round gives every active job one optimizer step (`Engine.train_round`), then
evaluates the jobs whose evaluation is due, checkpoints the jobs whose
`save_steps` came due and every job that finished, and finishes jobs: a done
job's adapter is exported and the job leaves the engine; a failed job leaves
it too. Between rounds, every job on the engine still has steps to take.

Where checkpoints and adapters go is the caller's (`JobOutputs`): a local
directory for `carpool train`, the artifact store for a worker. In a group,
every rank runs every round (the same jobs, so the same collectives) and only
the leader writes: the other ranks pass no outputs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from carpool.workers.peft_files.peft_export import AdapterExportError, export_adapter
from carpool.workers.training.checkpoint import save_checkpoint
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_history import write_trainer_state
from carpool.workers.training.training_job import TrainingJob


class JobOutputs(Protocol):
    """Where a job's checkpoints and finished adapter go."""

    def save_checkpoint(self, job: TrainingJob) -> str | None:
        """Checkpoint `job` now; where it went (None where checkpoints are off)."""
        ...

    def export_adapter(self, job: TrainingJob) -> str:
        """Write the finished job's PEFT adapter; where it went."""
        ...


@dataclass(frozen=True, kw_only=True)
class JobRoundResult:
    """One job's outcome of one round: its optimizer step, and what was written after it."""

    job: str
    step: int  # steps done after this round
    total_steps: int
    loss: float  # mean cross-entropy over the step's trainable tokens
    tokens: int  # real tokens of the step
    tokens_per_second: float  # the step's tokens over the round's time
    tokens_seen: int  # real tokens of all the job's steps so far
    learning_rate: float  # of the step
    grad_norm: float  # of the step's gradients, before clipping
    error: str | None = None  # the job failed of its own fault (e.g. a NaN loss) and left
    eval_loss: float | None = None  # loss on the job's eval rows, when it was evaluated
    checkpoint: str | None = None  # where the checkpoint taken after this step went
    adapter: str | None = None  # where the finished job's adapter went
    history: tuple[dict, ...] = ()  # the job's history entries kept in this round (log_history)
    # The objective's own figures of the step, by TRL's names (`rewards/margins`, ...).
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.error is None and self.step >= self.total_steps


def run_round(engine: Engine, outputs: JobOutputs | None) -> list[JobRoundResult]:
    """One round for every active job; `outputs` None writes nothing (a non-leader rank)."""
    started = time.perf_counter()
    kept = {name: len(job.history.entries) for name, job in engine.jobs.items()}
    reports = engine.train_round()
    # After the update, so an evaluation at step N sees the adapter of step N.
    eval_losses = engine.evaluate([name for name in reports if engine.jobs[name].eval_due])
    for name, loss in eval_losses.items():  # before any checkpoint: it holds the history
        engine.jobs[name].record_eval(loss)
    seconds = max(time.perf_counter() - started, 1e-9)
    results = []
    for name, report in reports.items():
        job = engine.jobs[name]
        history = tuple(job.history.entries[kept.get(name, 0) :])
        checkpoint = adapter = None
        error = report.error
        if error is not None:
            engine.remove_job(name)
        else:
            if outputs is not None and (job.done or job.step % job.config.training.save_steps == 0):
                checkpoint = outputs.save_checkpoint(job)
            if job.done:
                try:
                    adapter = finish_job(engine, name, outputs)
                except AdapterExportError as e:  # this job's alone; its checkpoint stays
                    error = f"export: {e}"
                    engine.remove_job(name)
        results.append(
            JobRoundResult(
                job=name,
                step=report.step,
                total_steps=report.total_steps,
                loss=report.loss,
                tokens=report.tokens,
                tokens_per_second=report.tokens / seconds,
                tokens_seen=job.tokens_seen,
                learning_rate=report.learning_rate,
                grad_norm=report.grad_norm,
                error=error,
                eval_loss=eval_losses.get(name),
                checkpoint=checkpoint,
                adapter=adapter,
                history=history,
                metrics={
                    **report.metrics,
                    **(job.eval_metrics if name in eval_losses else {}),
                },
            )
        )
    return results


def finish_job(engine: Engine, name: str, outputs: JobOutputs | None) -> str | None:
    """Export a done job's adapter (unless `outputs` is None) and take the job off the engine.

    Also for a job admitted already done (resumed from its final checkpoint):
    no round would ever report it.
    """
    job = engine.jobs[name]
    adapter = outputs.export_adapter(job) if outputs is not None else None
    engine.remove_job(name)
    return adapter


class LocalOutputs:
    """Adapters to `<adapters>/<job>/`; with a checkpoint directory, checkpoints to
    `<checkpoints>/<job>/step-<N>/`, the newest `keep_checkpoints` of them kept."""

    def __init__(
        self, adapters: Path, checkpoints: Path | None = None, keep_checkpoints: int = 2
    ) -> None:
        self.adapters = Path(adapters)
        self.checkpoints = Path(checkpoints) if checkpoints is not None else None
        self.keep_checkpoints = keep_checkpoints

    def save_checkpoint(self, job: TrainingJob) -> str | None:
        if self.checkpoints is None:
            return None
        return str(save_checkpoint(job, self.checkpoints / job.name, self.keep_checkpoints))

    def export_adapter(self, job: TrainingJob) -> str:
        return str(export_job(job, self.adapters / job.name))


def export_job(job: TrainingJob, out: Path) -> Path:
    """The job's PEFT adapter in `out`, with its history as HF's `trainer_state.json`."""
    export_adapter(
        job.adapter,
        out,
        base_model=job.config.base_model,
        base_quantization=job.config.base_quantization,
    )
    write_trainer_state(out, job.trainer_state())
    return out
