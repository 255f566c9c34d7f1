"""`carpool train`: run validated jobs fused, in this process, without Ray.

Jobs are grouped by base model; each group runs on one engine, every job's
rows fused into the same forward/backward. A job's PEFT adapter is written to
`<out>/<name>/` the moment it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from carpool.orchestrator.progress import JobProgressRow
from carpool.workers.engine import Engine
from carpool.workers.job_spec import JobSpec

ProgressFn = Callable[[JobProgressRow], None]


def group_by_base(configs: Sequence[JobSpec]) -> dict[str, list[JobSpec]]:
    groups: dict[str, list[JobSpec]] = {}
    for config in configs:
        groups.setdefault(config.base_model, []).append(config)
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
) -> dict[str, Path]:
    """Train every job to completion; returns each job's adapter directory.

    With `checkpoint_dir`, jobs checkpoint every `save_steps` and a rerun
    resumes each from its latest checkpoint.
    """
    report = on_progress or (lambda row: None)
    notice = on_notice or (lambda text: None)
    outputs: dict[str, Path] = {}
    for base, configs in group_by_base(specs).items():
        engine = Engine(
            base,
            device=device,
            micro_batch_tokens=micro_batch_tokens,
            checkpoint_root=checkpoint_dir,
            gradient_checkpointing=gradient_checkpointing,
            loss_chunk_tokens=loss_chunk_tokens,
            adapter_math=adapter_math,
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
            if engine.jobs[config.name].done:
                outputs[config.name] = engine.export(config.name, out_dir / config.name)
        last_eval: dict[str, float] = {}
        while engine.active_jobs():
            reports = engine.step()
            seconds = max(engine.last_round_seconds, 1e-9)
            for name, r in reports.items():
                done = engine.jobs[name].done
                if done:
                    outputs[name] = engine.export(name, out_dir / name)
                state = "done" if done else "running"
                if r.eval_loss is not None:
                    last_eval[name] = r.eval_loss
                tps = r.tokens / seconds
                report(
                    JobProgressRow(
                        name, r.step, r.total_steps, r.loss, tps, state, last_eval.get(name)
                    )
                )
    return outputs
