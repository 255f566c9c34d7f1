"""What the engine needs to know about one job, as plain dataclasses.

The user-facing spec (pydantic, validated, read from YAML) lives in
`orchestrator.spec` and converts into these; the engine never sees raw YAML.
Field names follow PEFT's `LoraConfig` and HF `TrainingArguments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DatasetFormat = Literal["text", "prompt_completion", "messages", "auto"]
SchedulerType = Literal["constant", "linear", "cosine"]


class JobInputError(ValueError):
    """A job's own input (its data, its adapter, its settings) cannot be used.

    The job fails with this message and is not retried: the engine and the
    other jobs on it are fine. `source` names the input: "dataset",
    "eval_dataset", "init_from", "adapter" or "training".
    """

    def __init__(self, job: str, source: str, reason: str) -> None:
        super().__init__(job, source, reason)  # the fields, so it pickles across Ray actors
        self.job, self.source, self.reason = job, source, reason

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class DatasetConfig:
    path: Path
    format: DatasetFormat = "auto"


@dataclass(frozen=True)
class AdapterConfig:
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    # A list of module-name suffixes (PEFT's matching) or "all-linear".
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = None
    freeze_lora_A: bool = False
    init_from: Path | None = None

    @property
    def scaling(self) -> float:
        if self.use_rslora:
            return self.lora_alpha / math.sqrt(self.r)
        return self.lora_alpha / self.r


@dataclass(frozen=True)
class TrainingConfig:
    max_steps: int | None = None
    num_epochs: float | None = None
    batch_size: int = 8
    learning_rate: float = 2e-4
    lr_scheduler_type: SchedulerType = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    max_seq_length: int = 512
    shuffle: bool = True
    seed: int = 0
    save_steps: int = 50
    eval_steps: int | None = None  # evaluate every N steps (and at the end); None: at the end

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps this job runs over a dataset of `num_rows` rows.

        Rows form one stream across epochs; each step takes the next
        `batch_size` of them, so `num_epochs` rounds up to whole steps.
        """
        if self.max_steps is not None:
            return self.max_steps
        assert self.num_epochs is not None
        return max(1, math.ceil(self.num_epochs * num_rows / self.batch_size))

    def rows_in_step(self, step: int, num_rows: int) -> int:
        """Rows that optimizer step `step` (0-based) consumes."""
        if self.max_steps is not None:
            return self.batch_size
        assert self.num_epochs is not None
        total_rows = math.ceil(self.num_epochs * num_rows)
        return max(0, min(self.batch_size, total_rows - step * self.batch_size))


@dataclass(frozen=True)
class JobConfig:
    name: str
    base_model: str
    dataset: DatasetConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    priority: int = 0
    eval_dataset: DatasetConfig | None = None  # held-out rows: loss only, never trained on
