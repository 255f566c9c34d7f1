"""What the comparisons with TRL's preference trainers share: the pairs, a job that trains
on all of them every step, carpool's run of it and TRL's training arguments set to it.

A tiny random Llama in float32 on CPU, dropout off, TRL's learning rate, schedule, Adam
settings and gradient clipping set to the job's, every record in every step (so both sides
see the same pairs whatever order TRL's loader keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from carpool.workers.spec.job_spec import AdapterSpec, JobSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import changed, job

STEPS = 5
PAIRS = [
    {"prompt": "the cat sat on", "chosen": " the mat", "rejected": " a fox"},
    {"prompt": "the quick brown", "chosen": " fox jumped", "rejected": " cat sat on a mat"},
    {"prompt": "Question: what is 2 plus 2?", "chosen": " Answer: 4.", "rejected": " Answer: 5."},
    {"prompt": "say hello", "chosen": " hello", "rejected": " goodbye and then some"},
]
# TRL's step figures every pair objective logs (`rewards/accuracies` is compared apart: at
# the first step of a reference-based objective every margin is 0 but for rounding).
REWARD_FIGURES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_job(base: Path, data: Path, objective: Any) -> JobSpec:
    config = job(
        "pairs",
        base,
        data,
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        batch_size=len(PAIRS),
        learning_rate=2e-2,
        max_grad_norm=1.0,
        max_steps=STEPS,
        max_seq_length=64,
    )
    return changed(config, objective=objective)


def train_carpool(base: Path, config: JobSpec) -> tuple[dict, dict[str, torch.Tensor], list]:
    """The adapter's start, its tensors after STEPS rounds, and each round's report."""
    engine = Engine(str(base), device="cpu")
    start = engine.add_job(config).adapter.named_tensors()
    start = {k: v.clone() for k, v in start.items()}
    reports = [engine.train_round()[config.name] for _ in range(STEPS)]
    return start, engine.jobs[config.name].adapter.named_tensors(), reports


def trl_training_arguments(config: JobSpec, out: Path) -> dict[str, Any]:
    """TrainingArguments fields every TRL trainer takes, set to the job's."""
    t = config.training
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        max_steps=STEPS,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        max_length=t.max_seq_length,
        train_sampling_strategy="sequential",
        bf16=False,  # TRL's default is bf16 autocast; the comparison is in float32
        gradient_checkpointing=False,  # TRL's default; the same math, recomputed
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=t.seed,
        dataloader_num_workers=0,
    )


def logged_steps(trainer: Any) -> list[dict[str, float]]:
    return [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
