"""`carpool train`: run validated jobs fused, in this process, without Ray.

Jobs are grouped by base model and its quantization; each group runs on one engine, every job's
rows fused into the same forward/backward. A job's PEFT adapter is written to
`<out>/<name>/` the moment it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from carpool.orchestrator.cli.progress import JobProgressRow
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import LocalOutputs, finish_job, run_round

ProgressFn = Callable[[JobProgressRow], None]


def group_by_base(
    configs: Sequence[JobSpec],
) -> dict[tuple[str, QuantizationSpec | None], list[JobSpec]]:
    """Jobs by (base model, base_quantization): one engine, one copy of the base, per key."""
    groups: dict[tuple[str, QuantizationSpec | None], list[JobSpec]] = {}
    for config in configs:
        groups.setdefault((config.base_model, config.base_quantization), []).append(config)
    return groups


def train_locally(
    specs: Sequence[JobSpec],
    out_dir: Path,
    *,
    on_progress: ProgressFn | None = None,
    on_notice: Callable[[str], None] | None = None,
    checkpoint_dir: Path | None = None,
    micro_batch_tokens: int | None = None,
    device: str | None = None,
    gradient_checkpointing: bool = False,
    loss_chunk_tokens: int | None = None,
    adapter_math: str = "auto",
    batch_layout: str = "auto",
) -> dict[str, Path]:
    """Train every job to completion; returns each finished job's adapter directory.

    With `checkpoint_dir`, jobs checkpoint every `save_steps` and a rerun
    resumes each from its latest checkpoint. A finished job's last checkpoint
    stays: a rerun finds the job done instead of training it again.
    """
    report = on_progress or (lambda row: None)
    notice = on_notice or (lambda text: None)
    outputs = LocalOutputs(out_dir, checkpoint_dir)
    adapters: dict[str, Path] = {}
    for (base, quantization), configs in group_by_base(specs).items():
        engine = Engine(
            base,
            quantization=quantization,
            device=device,
            micro_batch_tokens=micro_batch_tokens,
            gradient_checkpointing=gradient_checkpointing,
            loss_chunk_tokens=loss_chunk_tokens,
            adapter_math=adapter_math,
            batch_layout=batch_layout,
            reference_cache_dir=Path(out_dir) / ".reference-logps",  # beside the adapters
        )
        for config in configs:
            resume = checkpoint_dir / config.name if checkpoint_dir else None
            job = engine.add_job(config, resume_from=resume)
            for line in job.truncation_notices():
                notice(f"{job.name}: {line}")
            report(
                JobProgressRow(job.name, job.step, job.total_steps, job.last_loss, None, "queued")
            )
        for config in configs:  # resumed jobs may already be complete
            job = engine.jobs[config.name]
            if job.done:
                adapters[job.name] = Path(finish_job(engine, job.name, outputs))
                report(
                    JobProgressRow(job.name, job.step, job.total_steps, job.last_loss, None, "done")
                )
        last_eval: dict[str, float] = {}
        while engine.active_jobs():
            for r in run_round(engine, outputs):
                if r.adapter is not None:
                    adapters[r.job] = Path(r.adapter)
                if r.eval_loss is not None:
                    last_eval[r.job] = r.eval_loss
                if r.error is not None:
                    notice(f"{r.job}: failed: {r.error}")
                state = "failed" if r.error is not None else "done" if r.done else "running"
                report(
                    JobProgressRow(
                        r.job,
                        r.step,
                        r.total_steps,
                        r.loss,
                        r.tokens_per_second,
                        state,
                        eval_loss=last_eval.get(r.job),
                        learning_rate=r.learning_rate,
                        grad_norm=r.grad_norm,
                    )
                )
    return adapters
