"""A micro-batch's preference rows: sequence log-probs, the shared reference, their losses.

Each row's log-probability is minus the sum of its per-position cross-entropy over its
completion tokens. A pair's loss needs its chosen and its rejected row, which ride in one
micro-batch; a KTO record's loss needs its own row and its step's KL estimate. The
reference log-probs (DPO's and KTO's) come from one no-grad forward over the micro-batch's
preference rows of every job that needs a reference, whatever job they belong to, each
routed to its job's reference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from carpool.workers.data.dataset import TokenizedDataset
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.data.fused_batch import (
    CHOSEN,
    REJECTED,
    FusedBatch,
    StepRow,
    collate,
    plan_micro_batches,
    step_rows,
)
from carpool.workers.data.segment import Segment
from carpool.workers.losses.position_losses import scaled, token_nll
from carpool.workers.losses.preference_losses import (
    PairLogps,
    figure_names,
    kto_figures,
    kto_losses,
    pair_figures,
    pair_losses,
)
from carpool.workers.spec.objective import (
    KtoObjective,
    PairObjective,
    chosen_nll_weight,
    needs_reference,
)
from torch import nn

RowKey = tuple[str, int, int]  # (job, record, side)


def row_key(row: StepRow) -> RowKey:
    assert row.pair is not None
    return (row.job, row.pair.record, row.pair.side)


def row_sums(batch: FusedBatch, token_values: torch.Tensor) -> torch.Tensor:
    """Each row's sum of `token_values` (flattened per position) [rows]; keeps the graph."""
    sums = token_values.new_zeros(len(batch.rows))
    return sums.index_add(0, batch.token_row, token_values)


def completion_mask(batch: FusedBatch) -> torch.Tensor:
    """1 at each position whose target is a completion's token [tokens], else 0."""
    if batch.completion is not None:
        return batch.completion
    return (batch.targets.flatten() != IGNORE_INDEX).to(torch.float32)


def completion_logps(batch: FusedBatch, token_nll: torch.Tensor) -> torch.Tensor:
    """Each row's log-prob of its completion [rows]: minus its summed cross-entropy there."""
    if batch.completion is None:  # no prompt target: the loss is already 0 off completions
        return -row_sums(batch, token_nll)
    return -row_sums(batch, token_nll * batch.completion.to(token_nll.dtype))


def reference_logps(batch: FusedBatch, token_nll: torch.Tensor) -> dict[RowKey, float]:
    """Each row's reference log-prob, from the reference forward's per-position loss."""
    values = completion_logps(batch, token_nll.detach().double()).tolist()
    return {row_key(r): v for r, v in zip(batch.rows, values, strict=True)}


class Router(Protocol):
    """What routes a batch's rows to their row sets (the adapter bank)."""

    def route(
        self, segments: Sequence[Segment], packed: bool = False
    ) -> AbstractContextManager[None]: ...


@torch.no_grad()
def reference_pass(
    base: nn.Module,
    router: Router,
    reference: str,
    dataset: TokenizedDataset,
    *,
    pad_token_id: int,
    device: torch.device,
    packed: bool = False,
    micro_batch_tokens: int | None = None,
    loss_chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """The [records, 2] table of `dataset`'s pairs' log-probs through the row set
    `reference`, and the forwards it took. Every rank of a group runs the same forwards (the
    whole dataset, planned alike), so ZeRO-3's gathers match."""
    rows = step_rows(reference, dataset.rows, range(len(dataset.rows)))
    table = torch.zeros(len(dataset.rows), 2, dtype=torch.float64)
    micro_batches = plan_micro_batches(rows, micro_batch_tokens, packed)
    for micro in micro_batches:
        batch = collate(micro, pad_token_id, device, packed)
        with router.route(batch.segments, packed=batch.packed):
            nll = token_nll(base, batch, loss_chunk_tokens)
        for (_, record, side), value in reference_logps(batch, nll).items():
            table[record, side] = value
    return table, len(micro_batches)


def pair_terms(
    batch: FusedBatch,
    token_nll: torch.Tensor,
    reference: Mapping[RowKey, float],
    objectives: Mapping[str, PairObjective],
    kl: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor | None, dict[str, float], dict[str, dict[str, float]]]:
    """The micro-batch's preference loss to backpropagate (each record's loss times its
    1/records-in-step scale, summed), each job's share of its step loss, and each job's
    metric sums. `token_nll` is the policy's per-position cross-entropy, with graph; the
    chosen rows' cross-entropy term (CPO, ORPO) is the caller's token loss, only reported
    here (`nll_loss`). `kl` is each KTO job's KL estimate of the step."""
    sides: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # pair -> side -> row
    for i, row in enumerate(batch.rows):
        if row.pair is not None:
            sides[row.job, row.pair.record][row.pair.side] = i
    if not sides:  # a micro-batch of supervised rows only: nothing more to compute
        return None, {}, {}
    policy = completion_logps(batch, token_nll)  # [rows], the completions' log-probs
    by_job: dict[str, list[tuple[int, int]]] = defaultdict(list)
    singles: dict[str, list[int]] = defaultdict(list)  # KTO's rows: a record is one row
    for (job, _), at in sides.items():  # a pair's two rows always share a micro-batch
        if isinstance(objectives[job], KtoObjective):
            singles[job] += at.values()
        else:
            by_job[job].append((at[CHOSEN], at[REJECTED]))
    terms = {
        job: _kto_terms(batch, policy, reference, objectives[job], rows, (kl or {})[job])
        for job, rows in singles.items()
    }
    if by_job:
        counts = row_sums(batch, completion_mask(batch).double())
        # Each row's token loss as the caller sums it: CPO's and ORPO's cross-entropy share.
        weighted = any(chosen_nll_weight(objectives[job]) for job in by_job)
        scaled_nll = row_sums(batch, scaled(token_nll, batch).detach()) if weighted else None
        for job, pairs in by_job.items():
            terms[job] = _pair_terms_of_job(
                batch, policy, counts, scaled_nll, reference, objectives[job], pairs
            )
    total = None
    for term, _, _ in terms.values():
        total = term if total is None else total + term
    losses = {job: loss for job, (_, loss, _) in terms.items()}
    metrics = {job: sums for job, (_, _, sums) in terms.items()}
    return total, losses, metrics


def _pair_terms_of_job(
    batch: FusedBatch,
    policy: torch.Tensor,
    counts: torch.Tensor,
    scaled_nll: torch.Tensor | None,
    reference: Mapping[RowKey, float],
    objective: PairObjective,
    pairs: list[tuple[int, int]],
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """A pair job's rows of the micro-batch: their scaled loss, its value, and the job's sums."""
    chosen = torch.tensor([c for c, _ in pairs], device=policy.device)
    rejected = torch.tensor([r for _, r in pairs], device=policy.device)
    ref_chosen = ref_rejected = None
    if needs_reference(objective):
        ref = [
            (reference[row_key(batch.rows[c])], reference[row_key(batch.rows[r])]) for c, r in pairs
        ]
        ref_tensor = torch.tensor(ref, dtype=policy.dtype, device=policy.device)
        ref_chosen, ref_rejected = ref_tensor[:, 0], ref_tensor[:, 1]
    logps = PairLogps(
        chosen=policy[chosen],
        rejected=policy[rejected],
        chosen_tokens=counts[chosen].to(policy.dtype),
        rejected_tokens=counts[rejected].to(policy.dtype),
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    slot = batch.rows[pairs[0][0]].pair
    term = pair_losses(objective, logps).sum() * slot.scale
    nll_share = None
    if weight := chosen_nll_weight(objective):
        # Per pair, so that the step's pair mean is its chosen tokens' mean cross-entropy.
        nll_share = scaled_nll[chosen].sum() / (weight * slot.scale)
    # One host sync for the job's loss share and its figures.
    figures = pair_figures(objective, logps, nll_share)
    values = torch.cat([term.detach().view(1).to(figures.dtype), figures]).tolist()
    return term, values[0], dict(zip(figure_names(objective), values[1:], strict=True))


def _kto_terms(
    batch: FusedBatch,
    policy: torch.Tensor,
    reference: Mapping[RowKey, float],
    objective: KtoObjective,
    rows: list[int],
    kl: float,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """A KTO job's rows of the micro-batch: their scaled loss, its value, and the job's sums."""
    at = torch.tensor(rows, device=policy.device)
    ref = [reference[row_key(batch.rows[i])] for i in rows]
    ref_logps = torch.tensor(ref, dtype=policy.dtype, device=policy.device)
    desirable = torch.tensor([batch.rows[i].pair.side == CHOSEN for i in rows], device=at.device)
    logps = policy[at]
    term = (
        kto_losses(objective, logps, ref_logps, desirable, kl).sum()
        * batch.rows[rows[0]].pair.scale
    )
    figures = kto_figures(objective, logps, ref_logps, desirable, kl)
    values = torch.cat([term.detach().view(1).to(figures.dtype), figures]).tolist()
    return term, values[0], dict(zip(figure_names(objective), values[1:], strict=True))
