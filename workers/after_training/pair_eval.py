"""Finished adapters evaluated on preference pairs, fused: each one's objective loss and
TRL's reward figures, against one reference for all of them (DPO's; the other pair
objectives score the policy alone).

Every adapter is scored on the same pairs, so the reference log-probs are computed once
per pair, whatever the number of adapters: a no-grad pass of the base alone, or of one
reference adapter (`reference`, e.g. the supervised adapter a DPO run started from).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from carpool.workers.after_training.fused_inference import FusedAdapters
from carpool.workers.data.dataset import TokenizedDataset
from carpool.workers.data.fused_batch import collate, plan_micro_batches, step_rows
from carpool.workers.losses.paired_terms import RowKey, pair_terms, reference_pass
from carpool.workers.losses.position_losses import add_segment_losses, scaled, token_nll
from carpool.workers.losses.preference_losses import step_figures
from carpool.workers.peft_files.finished_adapters import load_finished_adapter
from carpool.workers.spec.objective import PairObjective, needs_reference
from carpool.workers.variants.job_adapter import JobAdapter

REFERENCE = "__reference__"  # the reference adapter's row set: never one of the results


@dataclass(frozen=True)
class PairEvalResult:
    name: str
    loss: float  # the objective's mean loss over the pairs
    figures: dict[
        str, float
    ]  # TRL's eval names: eval_rewards/accuracies, eval_rewards/margins, ...
    pairs: int


@torch.no_grad()
def evaluate_pairs(
    fused: FusedAdapters,
    dataset: TokenizedDataset,
    objective: PairObjective,
    reference: Path | None = None,
) -> list[PairEvalResult]:
    """Every adapter's loss and figures on `dataset`'s pairs, all adapters' rows fused;
    sorted by loss. The reference is the base, or the adapter at `reference`."""
    names = fused.names
    count = len(dataset.rows)
    shared: dict[tuple[int, int], float] = {}
    if needs_reference(objective):
        # The reference as a row set: the adapter at `reference`, or one with no modules.
        fused.bank.add(
            JobAdapter.without_modules(REFERENCE)
            if reference is None
            else load_finished_adapter(fused.base, REFERENCE, reference)
        )
        try:
            shared = _reference_logps(fused, dataset)
        finally:
            fused.bank.remove(REFERENCE)
    # Each adapter's rows look their reference up under their own name.
    keyed: dict[RowKey, float] = {
        (name, record, side): value for name in names for (record, side), value in shared.items()
    }
    rows = [r for n in names for r in step_rows(n, dataset.rows, range(count), objective)]
    losses: dict[str, float] = defaultdict(float)
    sums: dict[str, dict[str, float]] = {n: defaultdict(float) for n in names}
    objectives = dict.fromkeys(names, objective)
    for micro in plan_micro_batches(rows, fused.micro_batch_tokens):
        batch = collate(micro, fused.tokenizer.pad_token_id, fused.device)
        with fused.bank.route(batch.segments):
            nll = token_nll(fused.base, batch)
        add_segment_losses(losses, batch, scaled(nll, batch))  # CPO's, ORPO's NLL
        _, pair_losses, pair_sums = pair_terms(batch, nll, keyed, objectives)
        for name, value in pair_losses.items():
            losses[name] += value
        for name, job_sums in pair_sums.items():
            for metric, value in job_sums.items():
                sums[name][metric] += value
    figures = {n: step_figures(objective, sums[n], count) for n in names}
    results = [
        PairEvalResult(n, losses[n], {f"eval_{k}": v for k, v in figures[n].items()}, count)
        for n in names
    ]
    return sorted(results, key=lambda r: (r.loss, r.name))


def _reference_logps(
    fused: FusedAdapters, dataset: TokenizedDataset
) -> dict[tuple[int, int], float]:
    """Each (record, side)'s reference log-prob: one pass over the pairs, through the
    reference row set."""
    table, _ = reference_pass(
        fused.base,
        fused.bank,
        REFERENCE,
        dataset,
        pad_token_id=fused.tokenizer.pad_token_id,
        device=fused.device,
        micro_batch_tokens=fused.micro_batch_tokens,
    )
    return {
        (record, side): value
        for record, sides in enumerate(table.tolist())
        for side, value in enumerate(sides)
    }
