"""What a job's rows train toward: its `objective` mapping.

`sft` is supervised cross-entropy over the trained tokens (the default). The others train
on pairs of completions: `dpo` (Direct Preference Optimization) against a frozen reference
policy, `simpo`, `cpo` and `orpo` without one; `kto` trains on single completions
labelled desirable or not, against a reference. Their options and defaults are TRL's
(`DPOConfig`, `CPOConfig`, `ORPOConfig`, `KTOConfig`), so a TRL user recognises every field. Each type
forbids the options of the others: `label_smoothing` on an `sft` job is an error, not a
setting silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

# The dataset formats each objective trains on (the others are refused, naming both).
SUPERVISED_FORMATS = ("text", "prompt_completion", "messages")
PAIRED_FORMATS = ("preference",)
UNPAIRED_FORMATS = ("unpaired_preference",)


class _ObjectiveModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SftObjective(_ObjectiveModel):
    """Mean cross-entropy over the step's trained tokens (HF's causal-LM loss)."""

    type: Literal["sft"] = "sft"

    @property
    def formats(self) -> tuple[str, ...]:
        return SUPERVISED_FORMATS


class DpoObjective(_ObjectiveModel):
    """DPO on (prompt, chosen, rejected) records, as TRL's DPOTrainer computes it.

    With Δ = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)),
    log-probabilities summed over each completion's tokens:
    sigmoid −logσ(βΔ); hinge relu(1 − βΔ); ipo (Δ' − 1/(2β))² with Δ' the same difference of
    per-token means; robust ((1−ε)·(−logσ(βΔ)) − ε·(−logσ(−βΔ))) / (1 − 2ε).
    """

    type: Literal["dpo"]
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust's ε: the share of flipped labels
    # One no-grad pass over the data before the first step, kept on disk and reused by every
    # job on the same data and reference (TRL's name); off, each micro-batch's reference is
    # computed as it trains.
    precompute_ref_log_probs: bool = False

    @model_validator(mode="after")
    def _smoothing_is_robusts(self) -> Self:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing is used by loss_type robust only; this loss_type is "
                f"{self.loss_type}"
            )
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        return PAIRED_FORMATS


class _ReferenceFreeObjective(_ObjectiveModel):
    """A pair objective that scores the policy alone: no reference policy, no reference pass."""

    beta: float = Field(0.1, gt=0)

    @property
    def formats(self) -> tuple[str, ...]:
        return PAIRED_FORMATS


class SimpoObjective(_ReferenceFreeObjective):
    """SimPO, as TRL's CPOTrainer computes it with `loss_type: simpo` and `cpo_alpha: 0`:
    −logσ(β(m_chosen − m_rejected) − γ), m a completion's mean per-token log-prob."""

    type: Literal["simpo"]
    simpo_gamma: float = 0.5  # the target reward margin γ (TRL's default)


class CpoObjective(_ReferenceFreeObjective):
    """CPO, as TRL's CPOTrainer computes it (`loss_type: sigmoid`): −logσ(β(s_chosen −
    s_rejected)), s a completion's summed log-prob, plus `cpo_alpha` times the mean
    cross-entropy of the step's chosen completion tokens."""

    type: Literal["cpo"]
    cpo_alpha: float = Field(1.0, ge=0)


class OrpoObjective(_ReferenceFreeObjective):
    """ORPO, as TRL's ORPOTrainer computes it: the mean cross-entropy of the step's chosen
    rows over prompt and completion, minus β·logσ(log odds(chosen) − log odds(rejected)),
    odds(y) = p/(1 − p) with p the completion's mean per-token probability (geometric)."""

    type: Literal["orpo"]


class KtoObjective(_ObjectiveModel):
    """KTO on (prompt, completion, label) records, as TRL's KTOTrainer computes it.

    With r = log π(completion) − log π_ref(completion) and z the step's KL estimate (the mean
    of the same log-ratio over mismatched prompt/completion pairs of the step, no gradient,
    at least 0): a desirable completion's loss is `desirable_weight`·(1 − σ(β(r − z))), an
    undesirable one's `undesirable_weight`·(1 − σ(β(z − r))); a step's loss is their mean.
    """

    type: Literal["kto"]
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)

    @property
    def formats(self) -> tuple[str, ...]:
        return UNPAIRED_FORMATS


AnyObjective = (
    SftObjective | DpoObjective | SimpoObjective | CpoObjective | OrpoObjective | KtoObjective
)
# The objectives whose rows train against each other (a record's completions, or a step's).
PairObjective = DpoObjective | SimpoObjective | CpoObjective | OrpoObjective | KtoObjective
Objective = Annotated[AnyObjective, Field(discriminator="type")]
OBJECTIVE_MODELS: dict[str, type[_ObjectiveModel]] = {
    "sft": SftObjective,
    "dpo": DpoObjective,
    "simpo": SimpoObjective,
    "cpo": CpoObjective,
    "orpo": OrpoObjective,
    "kto": KtoObjective,
}
OBJECTIVE_TYPES = tuple(OBJECTIVE_MODELS)


def is_preference(objective: AnyObjective) -> bool:
    """Whether the objective learns from preferences (anything but `sft`)."""
    return objective.type != "sft"


def is_paired(objective: AnyObjective) -> bool:
    """Whether a record is a pair of completions (two rows that ride together)."""
    return is_preference(objective) and objective.type != "kto"


def needs_reference(objective: AnyObjective) -> bool:
    """Whether the objective compares the policy with a frozen reference policy."""
    return objective.type in ("dpo", "kto")


def chosen_nll_weight(objective: AnyObjective) -> float:
    """The weight of the chosen rows' mean cross-entropy in the loss (CPO's `cpo_alpha`,
    ORPO's 1; 0 where the objective has no such term)."""
    if isinstance(objective, CpoObjective):
        return objective.cpo_alpha
    return 1.0 if isinstance(objective, OrpoObjective) else 0.0


def nll_covers_prompt(objective: AnyObjective) -> bool:
    """Whether the chosen rows' cross-entropy counts the prompt's tokens too (ORPO's does)."""
    return isinstance(objective, OrpoObjective)


def mean_logps(objective: AnyObjective) -> bool:
    """Whether a completion's log-prob is its per-token mean (SimPO, ORPO) or its sum."""
    return isinstance(objective, (SimpoObjective, OrpoObjective))


def format_problem(objective: AnyObjective, data_format: str) -> str | None:
    """Why a dataset of `data_format` cannot train `objective`, or None when it can."""
    if data_format in objective.formats:
        return None
    wanted = " or ".join(objective.formats)
    return (
        f"objective {objective.type} trains on {wanted} data; this dataset's format is "
        f"{data_format}"
    )
