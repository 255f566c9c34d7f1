"""Jobs the engine tests share: the three reference jobs, a data-parallel group's jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import run_round

from tests.helpers.round_driver import KeepFinished

STEPS = 10


def job(name: str, base: Path, data: Path, adapter: AdapterSpec, **training: Any) -> JobSpec:
    defaults = dict(max_steps=STEPS, batch_size=4, learning_rate=5e-3, shuffle=False)
    return JobSpec(
        name=name,
        base_model=str(base),
        dataset=DatasetSpec(path=data),
        adapter=adapter,
        training=TrainingSpec(**{**defaults, **training}),
    )


def changed(
    config: JobSpec,
    *,
    adapter: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    **fields: Any,
) -> JobSpec:
    """`config` with some fields changed. Not validated, like `model_copy`: a test may hand the
    engine a job that validation would refuse."""
    if adapter is not None:
        fields["adapter"] = config.adapter.model_copy(update=adapter)
    if training is not None:
        fields["training"] = config.training.model_copy(update=training)
    return config.model_copy(update=fields)


def three_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    """Jobs that differ in r, lora_alpha, targets, LR, schedule, batch_size and max_seq_length."""
    return [
        job(
            "text",
            base,
            datasets["text"],
            AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            batch_size=4,
            learning_rate=1e-2,
            max_seq_length=12,
        ),
        job(
            "qa",
            base,
            datasets["prompt_completion"],
            AdapterSpec(r=8, lora_alpha=32, target_modules="all-linear", use_rslora=True),
            batch_size=3,
            learning_rate=5e-3,
            lr_scheduler_type="linear",
            warmup_steps=2,
            weight_decay=0.01,
            max_grad_norm=0.5,
            max_seq_length=64,
        ),
        job(
            "chat",
            base,
            datasets["messages"],
            AdapterSpec(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
            batch_size=5,
            learning_rate=2e-2,
            lr_scheduler_type="cosine",
            max_seq_length=40,
        ),
    ]


def randomize_b(engine: Engine, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Give B non-zero values so step 1 already exercises every path; returns the start."""
    adapter = engine.jobs[name].adapter
    gen = torch.Generator().manual_seed(seed)
    start = {}
    for key, tensor in adapter.named_tensors().items():
        start[key] = (
            torch.randn(tensor.shape, generator=gen) * 0.05 if key.endswith("lora_B") else tensor
        ).clone()
    adapter.load_tensors(start)
    return start


def dropout_and_shuffle(configs: list[JobSpec]) -> list[JobSpec]:
    """The three reference jobs with LoRA dropout and shuffling on: both must replay exactly."""
    return [changed(c, adapter={"lora_dropout": 0.2}, training={"shuffle": True}) for c in configs]


def group_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    """The jobs a group of two ranks trains: odd batches, a job rank 1 never sees, LoRA-FA."""

    def job(name, data, adapter, eval_data=None, **training) -> JobSpec:
        t = {"learning_rate": 1e-2, "shuffle": True, "seed": 5, **training}
        evaluate = DatasetSpec(path=eval_data) if eval_data else None
        return JobSpec(
            name=name, base_model=str(base), dataset=DatasetSpec(path=data), adapter=adapter,
            training=TrainingSpec(**t), eval_dataset=evaluate,
        )  # fmt: skip

    return [
        # An odd batch: the ranks get 3 and 2 rows.
        # Evaluated every 2 steps on rows the ranks split between them.
        job("odd", datasets["text"], AdapterSpec(r=4, target_modules="all-linear"),
            datasets["prompt_completion"], max_steps=6, batch_size=5, max_grad_norm=0.5,
            eval_steps=2),
        # One row per step, one eval row: rank 1 never has a row of this job.
        job("single", datasets["messages"], AdapterSpec(r=2, lora_dropout=0.1),
            datasets["one_row"], max_steps=4, batch_size=1, lr_scheduler_type="cosine"),
        job("lorafa", datasets["prompt_completion"],
            AdapterSpec(r=8, target_modules=["q_proj", "down_proj"], freeze_lora_A=True),
            max_steps=5, batch_size=4),
    ]  # fmt: skip


def step_losses(engine: Engine, finished: KeepFinished) -> dict[str, float]:
    """One round's training losses, and eval losses as "<job>:eval"."""
    out = {}
    for result in run_round(engine, finished):
        out[result.job] = result.loss
        if result.eval_loss is not None:
            out[f"{result.job}:eval"] = result.eval_loss
    return out
