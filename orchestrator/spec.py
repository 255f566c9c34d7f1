"""The user-facing job spec: what a YAML job file may say, checked by pydantic.

Only the shape and bounds of single fields live here; checks that need the
base model or the dataset on disk live in `orchestrator.validation`. Every
model forbids unknown fields so a typo (`lora_aplha`) is an error, not a
silently ignored setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from carpool.workers.job_config import AdapterConfig, DatasetConfig, JobConfig, TrainingConfig
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
DATASET_SUFFIXES = (".jsonl", ".parquet")
# Error type of the max_steps/num_epochs rule; validation reports it per field
# from the raw YAML instead, so it is not lost when another training field fails.
STEPS_XOR_EPOCHS = "steps_xor_epochs"
EVAL_NEEDS_DATASET = "eval_needs_dataset"


class _SpecModel(BaseModel):
    # Lax mode on purpose: PyYAML reads `1e-4` (no dot) as a string, which must
    # still parse as a float. Counts use StrictInt so `r: true` or `r: 8.5` fail.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_SpecModel):
    path: Path
    format: Literal["text", "prompt_completion", "messages", "auto"] = "auto"

    @field_validator("path")
    @classmethod
    def _known_suffix(cls, path: Path) -> Path:
        if path.suffix.lower() not in DATASET_SUFFIXES:
            raise ValueError(f"must end in {' or '.join(DATASET_SUFFIXES)}, got {str(path)!r}")
        return path

    def to_config(self) -> DatasetConfig:
        return DatasetConfig(path=Path(self.path), format=self.format)


class AdapterSpec(_SpecModel):
    r: StrictInt = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    freeze_lora_A: bool = False
    init_from: Path | None = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_or_all_linear(cls, value: Any) -> Any:
        # One clear message instead of pydantic's per-union-member errors.
        if value == "all-linear":
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError('must be a non-empty list of module names, or the string "all-linear"')


class TrainingSpec(_SpecModel):
    max_steps: StrictInt | None = Field(None, ge=1)
    num_epochs: float | None = Field(None, gt=0)
    batch_size: StrictInt = Field(8, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: StrictInt = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(None, gt=0)
    max_seq_length: StrictInt = Field(512, ge=2)
    shuffle: bool = True
    seed: StrictInt = 0
    save_steps: StrictInt = Field(50, ge=1)
    # With eval_dataset: evaluate every N steps and at the end (default: at the end).
    eval_steps: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _steps_xor_epochs(self) -> TrainingSpec:
        if (self.max_steps is None) == (self.num_epochs is None):
            raise PydanticCustomError(STEPS_XOR_EPOCHS, steps_xor_epochs_message(self.max_steps))
        return self


class JobSpec(_SpecModel):
    name: str
    base_model: str = Field(min_length=1)
    dataset: DatasetSpec
    adapter: AdapterSpec = AdapterSpec()
    # Required: its defaults alone set neither max_steps nor num_epochs.
    training: TrainingSpec
    priority: StrictInt = 0
    eval_dataset: DatasetSpec | None = None  # held-out rows, for the eval loss only

    @model_validator(mode="after")
    def _eval_steps_need_data(self) -> JobSpec:
        if self.training.eval_steps is not None and self.eval_dataset is None:
            raise PydanticCustomError(EVAL_NEEDS_DATASET, "eval_steps needs an eval_dataset")
        return self

    @field_validator("name")
    @classmethod
    def _name_chars(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"must be 1-64 characters of a-z, 0-9, '_' or '-', got {name!r}")
        return name

    def to_config(self) -> JobConfig:
        """The engine's plain-dataclass view of this spec."""
        a, t = self.adapter, self.training
        targets = a.target_modules if isinstance(a.target_modules, str) else tuple(a.target_modules)
        return JobConfig(
            name=self.name,
            base_model=self.base_model,
            dataset=self.dataset.to_config(),
            adapter=AdapterConfig(
                r=a.r,
                lora_alpha=a.lora_alpha,
                lora_dropout=a.lora_dropout,
                target_modules=targets,
                use_rslora=a.use_rslora,
                loraplus_lr_ratio=a.loraplus_lr_ratio,
                freeze_lora_A=a.freeze_lora_A,
                init_from=Path(a.init_from) if a.init_from is not None else None,
            ),
            training=TrainingConfig(**t.model_dump()),
            priority=self.priority,
            eval_dataset=self.eval_dataset.to_config() if self.eval_dataset else None,
        )


def steps_xor_epochs_message(max_steps: object) -> str:
    if max_steps is None:
        return "set one of max_steps or num_epochs"
    return "set only one of max_steps or num_epochs, not both"


def resolve_spec_paths(raw: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of a raw spec with its relative paths taken relative to `base_dir`.

    `base_dir` is the YAML file's folder, so a job file can name its data next
    to itself. `base_model` may also be a hub id or a path relative to the
    working directory: it changes only when the YAML-relative path exists.
    Values of the wrong type are left for the schema to report.
    """
    out = dict(raw)
    base = out.get("base_model")
    if isinstance(base, str) and base and not Path(base).expanduser().is_absolute():
        candidate = base_dir / base
        if candidate.exists():
            out["base_model"] = str(candidate)
    for section, key in (("dataset", "path"), ("eval_dataset", "path"), ("adapter", "init_from")):
        sub = out.get(section)
        if isinstance(sub, Mapping) and isinstance(sub.get(key), str) and sub[key]:
            path = Path(sub[key]).expanduser()
            out[section] = {**sub, key: str(path if path.is_absolute() else base_dir / path)}
    return out
