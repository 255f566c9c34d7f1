"""A micro-batch's preference pairs: sequence log-probs, the shared reference, pair losses.

Each row's log-probability is minus the sum of its per-position cross-entropy over its
trained (completion) tokens; a pair's loss needs its chosen and its rejected row, which
ride in one micro-batch. The reference log-probs come from the base alone: one no-grad
forward, without routing (so without any adapter), over the micro-batch's preference rows
of every job that needs a reference, whatever job they belong to.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.data.fused_batch import CHOSEN, REJECTED, FusedBatch, StepRow
from carpool.workers.losses.preference_losses import (
    PREFERENCE_METRICS,
    PairLogps,
    dpo_losses,
    preference_figures,
)
from carpool.workers.spec.objective import DpoObjective

RowKey = tuple[str, int, int]  # (job, record, side)


def row_key(row: StepRow) -> RowKey:
    assert row.pair is not None
    return (row.job, row.pair.record, row.pair.side)


def row_sums(batch: FusedBatch, token_values: torch.Tensor) -> torch.Tensor:
    """Each row's sum of `token_values` (flattened per position) [rows]; keeps the graph."""
    sums = token_values.new_zeros(len(batch.rows))
    return sums.index_add(0, batch.token_row, token_values)


def trained_counts(batch: FusedBatch) -> torch.Tensor:
    """Each row's trained positions (its completion's tokens) [rows]."""
    trained = (batch.targets.flatten() != IGNORE_INDEX).to(torch.float64)
    return row_sums(batch, trained)


def reference_logps(batch: FusedBatch, token_nll: torch.Tensor) -> dict[RowKey, float]:
    """Each row's reference log-prob, from the base-only forward's per-position loss."""
    values = (-row_sums(batch, token_nll.detach().double())).tolist()
    return {row_key(r): v for r, v in zip(batch.rows, values, strict=True)}


def pair_terms(
    batch: FusedBatch,
    token_nll: torch.Tensor,
    reference: Mapping[RowKey, float],
    objectives: Mapping[str, DpoObjective],
) -> tuple[torch.Tensor | None, dict[str, float], dict[str, dict[str, float]]]:
    """The micro-batch's preference loss to backpropagate (each pair's loss times its
    1/pairs-in-step scale, summed), each job's share of its step loss, and each job's
    metric sums. `token_nll` is the policy's per-position cross-entropy, with graph."""
    sides: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # pair -> side -> row
    for i, row in enumerate(batch.rows):
        if row.pair is not None:
            sides[row.job, row.pair.record][row.pair.side] = i
    if not sides:  # a micro-batch of supervised rows only: nothing more to compute
        return None, {}, {}
    policy = -row_sums(batch, token_nll)  # [rows], the sequence log-probs
    counts = trained_counts(batch)
    by_job: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (job, _), at in sides.items():  # a pair's two rows always share a micro-batch
        by_job[job].append((at[CHOSEN], at[REJECTED]))
    total: torch.Tensor | None = None
    losses: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    for job, pairs in by_job.items():
        chosen = torch.tensor([c for c, _ in pairs], device=policy.device)
        rejected = torch.tensor([r for _, r in pairs], device=policy.device)
        ref = [
            (reference[row_key(batch.rows[c])], reference[row_key(batch.rows[r])]) for c, r in pairs
        ]
        ref_tensor = torch.tensor(ref, dtype=policy.dtype, device=policy.device)
        logps = PairLogps(
            chosen=policy[chosen],
            rejected=policy[rejected],
            ref_chosen=ref_tensor[:, 0],
            ref_rejected=ref_tensor[:, 1],
            chosen_tokens=counts[chosen].to(policy.dtype),
            rejected_tokens=counts[rejected].to(policy.dtype),
        )
        objective = objectives[job]
        scale = batch.rows[pairs[0][0]].pair.scale
        term = dpo_losses(objective, logps).sum() * scale
        total = term if total is None else total + term
        # One host sync for the job's loss share and its figures.
        values = torch.cat([term.detach().view(1), preference_figures(objective, logps)]).tolist()
        losses[job] = values[0]
        metrics[job] = dict(zip(PREFERENCE_METRICS, values[1:], strict=True))
    return total, losses, metrics
