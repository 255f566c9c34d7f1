"""Preference losses from sequence log-probabilities, as TRL computes them, and their metrics.

Each pair's loss comes from the policy's log-probability of the chosen and of the rejected
completion (summed over the completion's tokens), each completion's token count (for the
objectives that use per-token means) and, for DPO, the reference's log-probabilities. A
step's loss is the mean over its pairs, so a pair contributes `loss / pairs in the step`
wherever in the step's micro-batches it rides. CPO's and ORPO's cross-entropy of the chosen
rows is a token loss like a supervised job's (see `fused_batch.step_rows`), not a pair term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from carpool.workers.spec.objective import (
    CpoObjective,
    DpoObjective,
    KtoObjective,
    OrpoObjective,
    PairObjective,
    SimpoObjective,
    mean_logps,
)

# TRL's names for what a preference step logs (`rewards/*` and `logps/*`, every trainer's).
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
NLL_METRIC = "nll_loss"  # CPO's and ORPO's: the chosen rows' mean cross-entropy
ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen")
# KTO's sums: its figures are means over the step's desirable or undesirable completions.
KTO_SUMS = (
    "kl",
    "rewards/chosen",
    "logps/chosen",
    "count/chosen",
    "rewards/rejected",
    "logps/rejected",
    "count/rejected",
)


def figure_names(objective: PairObjective) -> tuple[str, ...]:
    """The sums a job of `objective` adds up each step (`step_figures` makes TRL's figures
    of them)."""
    if isinstance(objective, KtoObjective):
        return KTO_SUMS
    if isinstance(objective, OrpoObjective):
        return (*PREFERENCE_METRICS, NLL_METRIC, *ORPO_METRICS)
    if isinstance(objective, CpoObjective):
        return (*PREFERENCE_METRICS, NLL_METRIC)
    return PREFERENCE_METRICS


@dataclass(frozen=True)
class PairLogps:
    """Per pair [pairs]: the policy's log-probs (with graph), summed over each completion,
    the completions' token counts, and the reference's log-probs (DPO only, no graph)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def policy(self, objective: PairObjective) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and rejected log-probs the objective scores: sums, or per-token means."""
        if mean_logps(objective):
            return (
                self.chosen / self.chosen_tokens.clamp(min=1),
                self.rejected / self.rejected_tokens.clamp(min=1),
            )
        return self.chosen, self.rejected


def pair_losses(objective: PairObjective, logps: PairLogps) -> torch.Tensor:
    """Each pair's loss [pairs] (TRL's trainer formulas; CPO's and ORPO's cross-entropy aside)."""
    if isinstance(objective, DpoObjective):
        return _dpo_losses(objective, logps)
    chosen, rejected = logps.policy(objective)
    beta = objective.beta
    if isinstance(objective, SimpoObjective):
        return -F.logsigmoid(beta * (chosen - rejected) - objective.simpo_gamma)
    if isinstance(objective, CpoObjective):
        return -F.logsigmoid(beta * (chosen - rejected))
    return -beta * F.logsigmoid(_log_odds(chosen, rejected))  # orpo


def _dpo_losses(objective: DpoObjective, logps: PairLogps) -> torch.Tensor:
    assert logps.ref_chosen is not None and logps.ref_rejected is not None
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


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −ln 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def _log_odds(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)) from mean log-probs, odds(p) = p / (1 − p)."""
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def pair_figures(
    objective: PairObjective, logps: PairLogps, nll_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """The sums over these pairs of `figure_names(objective)`, in that order, on the device
    (the caller syncs once; the step divides by its pair count). `nll_sum` is CPO's or ORPO's
    cross-entropy share of these pairs (so that it, too, averages to the step's value)."""
    with torch.no_grad():
        chosen, rejected = logps.policy(objective)
        if isinstance(objective, DpoObjective):
            assert logps.ref_chosen is not None and logps.ref_rejected is not None
            chosen_reward = objective.beta * (chosen - logps.ref_chosen)
            rejected_reward = objective.beta * (rejected - logps.ref_rejected)
        else:  # reference-free: the reward is β times the policy's own log-prob
            chosen_reward, rejected_reward = objective.beta * chosen, objective.beta * rejected
        figures = [
            chosen_reward.sum(),
            rejected_reward.sum(),
            (chosen_reward > rejected_reward).to(chosen.dtype).sum(),
            (chosen_reward - rejected_reward).sum(),
            chosen.sum(),
            rejected.sum(),
        ]
        if isinstance(objective, CpoObjective | OrpoObjective):
            figures.append(nll_sum if nll_sum is not None else chosen.new_zeros(()))
        if isinstance(objective, OrpoObjective):
            log_odds = _log_odds(chosen, rejected)
            figures += [F.logsigmoid(log_odds).sum(), log_odds.sum()]
        return torch.stack([f.to(chosen.dtype) for f in figures])


def step_figures(
    objective: PairObjective, sums: Mapping[str, float], records: int
) -> dict[str, float]:
    """A step's figures, by TRL's names, from its sums over `records` records: means over
    the records, or for KTO over its desirable (`chosen`) and undesirable (`rejected`)
    completions, each logged only when the step has some (as TRL logs them)."""
    if not isinstance(objective, KtoObjective):
        return {name: value / records for name, value in sums.items()}
    figures = {"kl": sums.get("kl", 0.0) / records}
    for side in ("chosen", "rejected"):
        count = sums.get(f"count/{side}", 0.0)
        if count:
            figures[f"rewards/{side}"] = sums[f"rewards/{side}"] / count
            figures[f"logps/{side}"] = sums[f"logps/{side}"] / count
    if "rewards/chosen" in figures and "rewards/rejected" in figures:
        figures["rewards/margins"] = figures["rewards/chosen"] - figures["rewards/rejected"]
    return figures


def kto_losses(
    objective: KtoObjective,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: float,
) -> torch.Tensor:
    """Each completion's KTO loss [completions] (TRL's KTOTrainer, `loss_type: kto`)."""
    ratio = logps - ref_logps
    beta = objective.beta
    wanted = objective.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    unwanted = objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, wanted, unwanted)


def kto_figures(
    objective: KtoObjective,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: float,
) -> torch.Tensor:
    """The sums over these completions of `KTO_SUMS`, in that order, on the device."""
    with torch.no_grad():
        rewards = objective.beta * (logps - ref_logps)
        figures = [logps.new_tensor(kl * len(logps))]
        for side in (desirable, ~desirable):
            figures += [rewards[side].sum(), logps[side].sum(), side.to(logps.dtype).sum()]
        return torch.stack(figures)
