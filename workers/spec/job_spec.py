"""A job, as a user writes it and as the engine trains it: one pydantic schema.

Each field is declared once, with its checks beside it; the engine reads these
models directly. Checks of a single field live in its type (an `Annotated`
validator or a `Field` bound), so a field can also be parsed on its own: the
validation of a job file (`orchestrator.validation`) parses what it can field
by field and still checks the base model and the data when another field
failed. A rule across fields is a plain function, named in its model's
`cross_field_rules`: the model enforces it, and validation applies it to what
parsed when unrelated fields failed. Checks that need the base model or the
data on disk live in `orchestrator.validation`.

Every model forbids unknown fields so a typo (`lora_aplha`) is an error, not a
silently ignored setting. Field names follow PEFT's `LoraConfig` and HF
`TrainingArguments`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from carpool.workers.spec.lora_patterns import key_problem, lora_scaling, pattern_value
from carpool.workers.spec.objective import Objective, SftObjective, format_problem, is_paired
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
DATASET_SUFFIXES = (".jsonl", ".parquet")
# The error type of the rules across fields (validation reports them itself, per field).
CROSS_FIELD = "cross_field"


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


def _job_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"must be 1-64 characters of a-z, 0-9, '_' or '-', got {name!r}")
    return name


def _dataset_path(path: Path) -> Path:
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise ValueError(f"must end in {' or '.join(DATASET_SUFFIXES)}, got {str(path)!r}")
    return path


def _names_or_all_linear(value: Any) -> Any:
    # One clear message instead of pydantic's per-union-member errors.
    if value == "all-linear":
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError('must be a non-empty list of module names, or the string "all-linear"')


def _pattern(value: Any, what: str, valid: Callable[[Any], bool]) -> dict[str, Any]:
    """A mapping of PEFT pattern keys to values, checked as a whole so each message names its key."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of module-name patterns to {what}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"key {key!r} must be a string (a module-name pattern)")
        if problem := key_problem(key):
            raise ValueError(problem)
        if not valid(item):
            raise ValueError(f"{key!r} must map to {what}, got {item!r}")
    return value


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    if isinstance(v, str):  # PyYAML reads `1e2` (no dot) as a string, as for lora_alpha
        try:
            v = float(v)
        except ValueError:
            return False
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _rank_pattern(value: Any) -> dict[str, int]:
    return _pattern(value, "a whole number >= 1", _positive_int)


def _alpha_pattern(value: Any) -> dict[str, float]:
    return {k: float(v) for k, v in _pattern(value, "a number > 0", _positive_number).items()}


JobName = Annotated[str, AfterValidator(_job_name)]
DatasetPath = Annotated[Path, AfterValidator(_dataset_path)]
# A list of module-name suffixes (PEFT's matching) or "all-linear".
TargetModules = Annotated[list[str] | Literal["all-linear"], BeforeValidator(_names_or_all_linear)]
# Per-module r / lora_alpha, keyed like PEFT's (`carpool.workers.spec.lora_patterns`).
RankPattern = Annotated[dict[str, int], BeforeValidator(_rank_pattern)]
AlphaPattern = Annotated[dict[str, float], BeforeValidator(_alpha_pattern)]


# -- rules across fields: (problem or None) from parsed values ------------------------------
def steps_xor_epochs(max_steps: int | None, num_epochs: float | None) -> str | None:
    if (max_steps is None) != (num_epochs is None):
        return None
    if max_steps is None:
        return "set one of max_steps or num_epochs"
    return "set only one of max_steps or num_epochs, not both"


PEFT_TYPES = ("LORA", "VERA", "ADALORA", "DYLORA", "SORA")


def _peft_type(value: Any) -> Any:
    if value not in PEFT_TYPES:
        raise ValueError(f"must be {', '.join(PEFT_TYPES[:-1])} or {PEFT_TYPES[-1]}, got {value!r}")
    return value


PeftType = Annotated[
    Literal["LORA", "VERA", "ADALORA", "DYLORA", "SORA"], BeforeValidator(_peft_type)
]
# Options of some kinds only, with their defaults (VeRA's and AdaLoRA's are PEFT's): a value
# other than the default on a job of another kind is an error, not a silent no-op.
LORA_AND_ADALORA: dict[str, Any] = {"lora_alpha": 16, "lora_dropout": 0.0}  # and DyLoRA's
LORA_ONLY: dict[str, Any] = {
    "use_rslora": False,
    "use_dora": False,
    "loraplus_lr_ratio": None,
    "freeze_lora_A": False,
    "rank_pattern": {},
    "alpha_pattern": {},
}
VERA_ONLY: dict[str, Any] = {
    "vera_dropout": 0.0,
    "d_initial": 0.1,
    "projection_prng_key": 0,
    "save_projection": True,
}
DYLORA_ONLY: dict[str, Any] = {"dylora_frozen": True, "export_ranks": None}
SORA_ONLY: dict[str, Any] = {"sparse_lambda": 10.0, "sparse_lambda_2": 3e-4, "sparse_lr": None}
ADALORA_ONLY: dict[str, Any] = {
    "init_r": 12,
    "target_r": 8,
    "tinit": 0,
    "tfinal": 0,
    "deltaT": 1,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
    "total_step": None,
}


def _kind_rule(name: str, default: Any, *kinds: str) -> CrossFieldRule:
    """`name` set (not its default) on a job whose peft_type is not one of `kinds` is an
    error."""

    def check(peft_type: str, value: Any) -> str | None:
        if peft_type in kinds or value == default:
            return None
        if name == "r" and peft_type == "ADALORA":
            return "r is not used by ADALORA; set init_r and target_r"
        return (
            f"{name} is a {' or '.join(kinds)} option; this job's adapter.peft_type is {peft_type}"
        )

    return CrossFieldRule(name, ("peft_type", name), check)


def adalora_schedule(
    peft_type: str, total_step: int | None, tinit: int, tfinal: int, init_from: Path | None
) -> str | None:
    """PEFT's checks on AdaLoRA's budget schedule (a job started from a saved adapter takes
    the adapter's, and validation checks the spec's against it)."""
    if peft_type != "ADALORA" or (total_step is None and init_from is not None):
        return None
    if total_step is None:
        return "ADALORA needs total_step (the steps its rank budget is planned over)"
    if tinit >= total_step - tfinal:
        return f"tinit ({tinit}) must be below total_step - tfinal ({total_step - tfinal})"
    return None


def export_ranks_fit(peft_type: str, export_ranks: list[int] | None, r: int) -> str | None:
    """DyLoRA exports ranks of its adapter: each in 1..r."""
    if peft_type != "DYLORA" or export_ranks is None:
        return None
    if outside := [b for b in export_ranks if not 1 <= b <= r]:
        return f"each rank must be in 1..r (r is {r}); got {outside}"
    return None


def adapter_variant(adapter: dict[str, Any]) -> str:
    """`lora`, `lora+dora`, `vera`, `adalora` or `dylora`, from an adapter section as a dict
    (a stored spec's)."""
    kind = adapter.get("peft_type", "LORA")
    if kind in ("VERA", "ADALORA", "DYLORA", "SORA"):
        return kind.lower()
    return "lora+dora" if adapter.get("use_dora") else "lora"


def objective_fits_format(objective: object, data_format: str) -> str | None:
    """A dataset's declared format must be one its objective trains on (`auto` is checked
    when the data is read)."""
    if data_format == "auto" or not hasattr(objective, "formats"):
        return None
    return format_problem(objective, data_format)


def kto_needs_company(objective: object, batch_size: int) -> str | None:
    """KTO estimates its KL term from a step's other records' completions: one is none."""
    if getattr(objective, "type", None) == "kto" and batch_size < 2:
        return (
            "objective kto needs batch_size >= 2: its KL term pairs each prompt with "
            "another record's completion of the same step"
        )
    return None


def eval_needs_dataset(eval_steps: int | None, eval_dataset: object) -> str | None:
    if eval_steps is not None and eval_dataset is None:
        return "eval_steps needs an eval_dataset"
    return None


@dataclass(frozen=True)
class CrossFieldRule:
    """A rule over fields of one model: `check` takes the values of `inputs` (dotted names
    under that model) and returns the problem, or None."""

    field: str  # the field a problem is reported on
    inputs: tuple[str, ...]
    check: Callable[..., str | None]

    def apply(self, model: BaseModel) -> str | None:
        return self.check(*(_dotted(model, name) for name in self.inputs))


def _dotted(model: BaseModel, name: str) -> Any:
    for part in name.split("."):
        model = getattr(model, part)
    return model


# -- the schema ------------------------------------------------------------------------------
class _SpecModel(BaseModel):
    # Lax mode on purpose: PyYAML reads `1e-4` (no dot) as a string, which must
    # still parse as a float. Counts use StrictInt so `r: true` or `r: 8.5` fail.
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Enforced when the model's fields all parse; validation also applies them
    # to what parsed when other fields failed.
    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @model_validator(mode="after")
    def _apply_cross_field_rules(self) -> Self:
        for rule in self.cross_field_rules:
            problem = rule.apply(self)
            if problem is not None:
                raise PydanticCustomError(CROSS_FIELD, problem)
        return self


class DatasetSpec(_SpecModel):
    path: DatasetPath
    format: Literal[
        "text", "prompt_completion", "messages", "preference", "unpaired_preference", "auto"
    ] = "auto"


class AdapterSpec(_SpecModel):
    r: StrictInt = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = ["q_proj", "v_proj"]
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # DoRA: a trained magnitude per output channel times the direction
    loraplus_lr_ratio: float | None = Field(None, gt=0)  # LoRA+: B's LR = ratio x LR
    freeze_lora_A: bool = False  # LoRA-FA: A stays at its initial value
    init_from: Path | None = None  # a PEFT adapter directory of the job's kind to start from
    rank_pattern: RankPattern = Field(default_factory=dict)  # module pattern -> its own r
    alpha_pattern: AlphaPattern = Field(default_factory=dict)  # module pattern -> its lora_alpha
    # VERA: frozen shared random projections, trained vectors per module (far fewer weights).
    peft_type: PeftType = "LORA"
    vera_dropout: float = Field(0.0, ge=0, lt=1)
    d_initial: float = 0.1  # lambda_d's starting value
    projection_prng_key: StrictInt = 0  # seeds the shared projections, as PEFT draws them
    save_projection: bool = True  # export the projections beside the vectors
    # ADALORA: SVD-form updates whose ranks are pruned from init_r toward target_r on average,
    # by importance, over PEFT's schedule (tinit warm-up, tfinal fixed, total_step in all).
    init_r: StrictInt = Field(12, ge=1)
    target_r: StrictInt = Field(8, ge=0)
    tinit: StrictInt = Field(0, ge=0)
    tfinal: StrictInt = Field(0, ge=0)
    deltaT: StrictInt = Field(1, ge=1)  # noqa: N815 (PEFT's name)
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(0.5, ge=0)
    total_step: StrictInt | None = Field(None, ge=1)
    # DYLORA: r is the largest rank; each step trains one drawn rank b <= r (the lower ones
    # frozen unless dylora_frozen is false); export_ranks are written, each as plain LoRA.
    dylora_frozen: bool = True
    export_ranks: list[Annotated[StrictInt, Field(ge=1)]] | None = Field(None, min_length=1)
    # SORA: r is the largest rank; a gate per component, the loss adds sparse_lambda x mean|g|,
    # the gates' own AdamW (at sparse_lr, default the job's) then a soft-threshold by
    # sparse_lambda_2 drive components to exact zeros (the official script's defaults).
    sparse_lambda: float = Field(10.0, ge=0)
    sparse_lambda_2: float = Field(3e-4, ge=0)
    sparse_lr: float | None = Field(None, gt=0)

    cross_field_rules = (
        (_kind_rule("r", 8, "LORA", "VERA", "DYLORA", "SORA"),)  # AdaLoRA's: init_r, target_r
        + tuple(
            _kind_rule(n, d, "LORA", "ADALORA", "DYLORA", "SORA")
            for n, d in LORA_AND_ADALORA.items()
        )
        + tuple(_kind_rule(name, default, "LORA") for name, default in LORA_ONLY.items())
        + tuple(_kind_rule(name, default, "VERA") for name, default in VERA_ONLY.items())
        + tuple(_kind_rule(n, d, "ADALORA") for n, d in ADALORA_ONLY.items())
        + tuple(_kind_rule(n, d, "DYLORA") for n, d in DYLORA_ONLY.items())
        + tuple(_kind_rule(n, d, "SORA") for n, d in SORA_ONLY.items())
        + (
            CrossFieldRule(
                "total_step",
                ("peft_type", "total_step", "tinit", "tfinal", "init_from"),
                adalora_schedule,
            ),
            CrossFieldRule("export_ranks", ("peft_type", "export_ranks", "r"), export_ranks_fit),
        )
    )

    @property
    def variant(self) -> str:
        """The adapter's kind in a word: `lora`, `lora+dora`, `vera`, `adalora`, `dylora` or
        `sora`."""
        return adapter_variant(self.model_dump())

    @property
    def dropout(self) -> float:
        """The dropout on the adapter's input, whichever kind it is."""
        return self.vera_dropout if self.peft_type == "VERA" else self.lora_dropout

    def rank_of(self, module: str) -> int:
        """The r of the targeted module named `module`: its rank_pattern entry, else r."""
        return pattern_value(self.rank_pattern, module, self.r)

    def scaling_of(self, module: str) -> float:
        """The module's LoRA scaling, from its own r and lora_alpha as PEFT computes it."""
        alpha = pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return lora_scaling(alpha, self.rank_of(module), self.use_rslora)


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
    # Keep a history entry (mean loss since the last one, LR, grad norm) every N steps
    # and at the last step, as HF's Trainer fills log_history.
    logging_steps: StrictInt = Field(10, ge=1)
    # With eval_dataset: evaluate every N steps and at the end (default: at the end).
    eval_steps: StrictInt | None = Field(None, ge=1)

    cross_field_rules = (
        CrossFieldRule("max_steps", ("max_steps", "num_epochs"), steps_xor_epochs),
    )

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


class QuantizationSpec(_SpecModel):
    """QLoRA: the frozen base loaded in 4 bits by bitsandbytes (BitsAndBytesConfig's names).

    Defaults are the QLoRA paper's. Jobs share a base only at the same quantization.
    """

    load_in_4bit: Literal[True] = True  # the one kind supported: 4-bit weights
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True  # quantize the quantization constants too
    # The dtype the 4-bit weights are dequantized to for each matmul.
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class JobSpec(_SpecModel):
    name: JobName
    base_model: str = Field(min_length=1)  # local path or hub id
    base_quantization: QuantizationSpec | None = None  # None: the base in its own precision
    dataset: DatasetSpec
    adapter: AdapterSpec = AdapterSpec()
    # Required: its defaults alone set neither max_steps nor num_epochs.
    training: TrainingSpec
    priority: StrictInt = 0
    eval_dataset: DatasetSpec | None = None  # held-out rows, for the eval loss only
    # What the rows train toward: supervised cross-entropy (sft) or a preference objective.
    objective: Objective = SftObjective()

    cross_field_rules = (
        CrossFieldRule(
            "training.eval_steps", ("training.eval_steps", "eval_dataset"), eval_needs_dataset
        ),
        CrossFieldRule("dataset.format", ("objective", "dataset.format"), objective_fits_format),
        CrossFieldRule(
            "training.batch_size", ("objective", "training.batch_size"), kto_needs_company
        ),
    )

    @property
    def tokens_per_step(self) -> int:
        """An upper bound of the padded tokens of one step: `batch_size` records of at most
        `max_seq_length` tokens, two rows each for a preference pair (admission counts both)."""
        rows = self.training.batch_size * (2 if is_paired(self.objective) else 1)
        return rows * self.training.max_seq_length
