"""What a job's rows train toward: its `objective` mapping.

`sft` is supervised cross-entropy over the trained tokens (the default). `dpo` is
Direct Preference Optimization on pairs of completions, against a frozen reference
policy; its options and defaults are TRL's `DPOConfig`'s, so a TRL user recognises
every field. Each type forbids the options of the others: `label_smoothing` on an
`sft` job is an error, not a setting silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

# The dataset formats each objective trains on (the others are refused, naming both).
SUPERVISED_FORMATS = ("text", "prompt_completion", "messages")
PAIRED_FORMATS = ("preference",)


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


Objective = Annotated[SftObjective | DpoObjective, Field(discriminator="type")]
OBJECTIVE_MODELS: dict[str, type[_ObjectiveModel]] = {"sft": SftObjective, "dpo": DpoObjective}
OBJECTIVE_TYPES = tuple(OBJECTIVE_MODELS)


def is_paired(objective: SftObjective | DpoObjective) -> bool:
    """Whether the objective trains on pairs (a record is two rows that ride together)."""
    return objective.type != "sft"


def format_problem(objective: SftObjective | DpoObjective, data_format: str) -> str | None:
    """Why a dataset of `data_format` cannot train `objective`, or None when it can."""
    if data_format in objective.formats:
        return None
    wanted = " or ".join(objective.formats)
    return (
        f"objective {objective.type} trains on {wanted} data; this dataset's format is "
        f"{data_format}"
    )
