"""Preference losses from sequence log-probabilities, as TRL computes them, and their metrics.

Each pair's loss comes from four numbers: the policy's and the reference's log-probability
of the chosen and of the rejected completion (summed over the completion's tokens), and,
for IPO, each completion's token count. A step's loss is the mean over its pairs, so a pair
contributes `loss / pairs in the step` wherever in the step's micro-batches it rides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from carpool.workers.spec.objective import DpoObjective

# TRL's names for what a preference step logs (DPOTrainer's `rewards/*` and `logps/*`).
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class PairLogps:
    """Per pair [pairs]: the policy's (with graph) and reference's (without) log-probs."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # completion tokens counted in each log-prob
    rejected_tokens: torch.Tensor


def dpo_losses(objective: DpoObjective, logps: PairLogps) -> torch.Tensor:
    """Each pair's DPO loss [pairs], by `objective.loss_type` (TRL's DPOTrainer formulas)."""
    beta = objective.beta
    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    delta = chosen_ratio - rejected_ratio
    if objective.loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if objective.loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if objective.loss_type == "ipo":
        # TRL normalises IPO's log-ratios by completion length (per-token means).
        chosen_mean = chosen_ratio / logps.chosen_tokens.clamp(min=1)
        rejected_mean = rejected_ratio / logps.rejected_tokens.clamp(min=1)
        return (chosen_mean - rejected_mean - 1 / (2 * beta)) ** 2
    eps = objective.label_smoothing  # robust
    clean = -(1 - eps) * F.logsigmoid(beta * delta)
    flipped = -eps * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * eps)


def preference_figures(objective: DpoObjective, logps: PairLogps) -> torch.Tensor:
    """The sums over these pairs of `PREFERENCE_METRICS`, in that order, on the device (the
    caller syncs once; the step divides by its pair count)."""
    with torch.no_grad():
        chosen = objective.beta * (logps.chosen - logps.ref_chosen)
        rejected = objective.beta * (logps.rejected - logps.ref_rejected)
        return torch.stack(
            [
                chosen.sum(),
                rejected.sum(),
                (chosen > rejected).to(chosen.dtype).sum(),
                (chosen - rejected).sum(),
                logps.chosen.sum(),
                logps.rejected.sum(),
            ]
        )
