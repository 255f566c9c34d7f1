"""Packing many jobs' step rows into fused micro-batches.

A supervised job's loss is a sum over its trainable tokens divided by their count
over the job's whole optimizer step, so the order of its rows and how they are
split into micro-batches do not change the math. A preference job's loss is a sum
over its pairs divided by their count in the step, each pair's term needing both
of its rows: a pair is one unit of planning, its two rows always in one
micro-batch. CPO's and ORPO's cross-entropy of the chosen rows is a token loss
like a supervised job's, normalized over the step's chosen tokens. That freedom lets us fill each micro-batch up to a token budget,
then group rows by job inside it so each job is one segment.

Two layouts (`BatchLayout`):

- `padded`: rows right-padded to the micro-batch's longest, [rows, seq]; rows
  are sorted by length so neighbours pad little. Under a causal mask a real
  token never sees padding, so no attention mask is needed.
- `packed`: the rows end to end in one sequence, [1, tokens], with
  `position_ids` restarting at 0 for each row; attention must never cross a
  row (`carpool.workers.data.row_attention`). A micro-batch costs its real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from carpool.workers.data.dataset_rows import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.preference_data import PreferencePair
from carpool.workers.data.segment import Segment
from carpool.workers.data.unpaired_data import LabelledCompletion, mismatched_rows
from carpool.workers.spec.objective import (
    AnyObjective,
    SftObjective,
    chosen_nll_weight,
    nll_covers_prompt,
)

# A row's side: a pair's chosen or rejected completion; for KTO, a desirable (CHOSEN) or
# undesirable (REJECTED) completion, or a KL row (MISMATCHED: a prompt with another's).
CHOSEN, REJECTED, MISMATCHED = 0, 1, 2
SUPERVISED = SftObjective()


@dataclass(frozen=True)
class PairSlot:
    """Where a preference row belongs: its record and which completion it is."""

    record: int  # the record's position in the job's record stream
    side: int  # CHOSEN, REJECTED or MISMATCHED
    scale: float  # 1 / records in the job's whole step
    prompt_targets: bool = False  # the prompt's tokens are targets too (ORPO's chosen rows)


@dataclass(frozen=True)
class StepRow:
    """One row of a job's current optimizer step."""

    job: str
    row: TokenizedRow
    row_id: int  # position in the job's row stream (a pair's rows: 2 * record + side)
    # 1 / trainable tokens in the job's whole step; for a pair's rows, the weight of the
    # chosen rows' cross-entropy over the step's chosen tokens (0 but for CPO and ORPO).
    loss_scale: float
    pair: PairSlot | None = None

    @property
    def unit(self) -> tuple[str, int]:
        """The rows that must share a micro-batch: a pair, or the row alone."""
        return (self.job, self.pair.record if self.pair is not None else self.row_id)


@dataclass
class FusedBatch:
    input_ids: torch.Tensor  # [rows, seq] right-padded, or [1, tokens] packed; long
    position_ids: torch.Tensor | None  # packed: [1, tokens], restarting per row; padded: None
    targets: torch.Tensor  # like input_ids: the next token, IGNORE_INDEX where untrained
    token_scale: torch.Tensor  # like input_ids, float64: each token's job loss scale
    token_segment: torch.Tensor  # [tokens] long, flattened: the segment of each position
    segments: tuple[Segment, ...]
    token_row: torch.Tensor  # [tokens] long, flattened: the row (of `rows`) of each position
    rows: tuple[StepRow, ...]  # in the batch's row order (grouped by job)
    # [tokens] float, flattened: 1 where the target is a completion's token. None when every
    # target is (no row trains its prompt), so `targets` alone tells the completions.
    completion: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None


def trainable_tokens(row: TokenizedRow) -> int:
    """Positions that contribute to the loss: the label of the next token is trained."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def step_rows(
    job: str,
    rows: Sequence[TokenizedRow | PreferencePair | LabelledCompletion],
    row_ids: Sequence[int],
    objective: AnyObjective = SUPERVISED,
) -> list[StepRow]:
    """Tag one job's step records with the scale that normalizes over the whole step: its
    trainable tokens, or for pairs its pair count (both rows of each pair tagged with it;
    the chosen rows also with their cross-entropy's weight over the step's chosen tokens;
    a labelled completion's row with its side by its label)."""
    if rows and isinstance(rows[0], LabelledCompletion):
        scale = 1.0 / len(rows)
        return [
            StepRow(job, r.row, i, 0.0, PairSlot(i, CHOSEN if r.desirable else REJECTED, scale))
            for r, i in zip(rows, row_ids, strict=True)
        ]
    if rows and isinstance(rows[0], PreferencePair):
        scale = 1.0 / len(rows)
        whole = nll_covers_prompt(objective)  # ORPO: prompt and completion, as TRL's
        nll_scale = 0.0
        if weight := chosen_nll_weight(objective):  # CPO, ORPO: counted only where weighed
            chosen_tokens = sum(
                len(p.chosen.input_ids) - 1 if whole else trainable_tokens(p.chosen) for p in rows
            )
            nll_scale = weight / chosen_tokens if chosen_tokens else 0.0
        return [
            StepRow(
                job,
                row,
                2 * i + side,
                nll_scale if side == CHOSEN else 0.0,
                PairSlot(i, side, scale, prompt_targets=whole and side == CHOSEN),
            )
            for pair, i in zip(rows, row_ids, strict=True)
            for side, row in enumerate(pair.rows)
        ]
    count = sum(trainable_tokens(r) for r in rows)
    scale = 1.0 / count if count else 0.0
    return [StepRow(job, r, i, scale) for r, i in zip(rows, row_ids, strict=True)]


def mismatched_step_rows(
    job: str, records: Sequence[LabelledCompletion], row_ids: Sequence[int]
) -> list[StepRow]:
    """KTO's KL rows of one job's step: each record's prompt with the step's previous
    record's completion (`unpaired_data.mismatched_rows`), each its own planning unit."""
    scale = 1.0 / len(records)
    rows = mismatched_rows(records)
    return [
        StepRow(job, row, i, 0.0, PairSlot(i, MISMATCHED, scale))
        for row, i in zip(rows, row_ids, strict=True)
    ]


def plan_micro_batches(
    rows: Sequence[StepRow], max_tokens: int | None, packed: bool = False
) -> list[list[StepRow]]:
    """Split rows into micro-batches of at most `max_tokens` tokens (padded ones, when padded).

    None means one micro-batch. A row (a pair) longer than the budget goes alone; a pair's
    two rows always share a micro-batch.
    """
    if max_tokens is None or not rows:
        return [list(rows)] if rows else []
    units = planning_units(rows)
    if packed:
        return _first_fit_decreasing(units, max_tokens)
    ordered = sorted(units, key=lambda u: max(len(r.row.input_ids) for r in u))
    batches: list[list[StepRow]] = []
    current: list[StepRow] = []
    for unit in ordered:
        # Ascending order: the newcomer holds the longest row.
        longest = max(len(r.row.input_ids) for r in unit)
        if current and (len(current) + len(unit)) * longest > max_tokens:
            batches.append(current)
            current = []
        current.extend(unit)
    if current:
        batches.append(current)
    return batches


def planning_units(rows: Sequence[StepRow]) -> list[list[StepRow]]:
    """The rows as units that ride together (a pair's two rows, or one row), in order."""
    units: dict[tuple[str, int], list[StepRow]] = {}
    for row in rows:
        units.setdefault(row.unit, []).append(row)
    return list(units.values())


def _first_fit_decreasing(units: list[list[StepRow]], max_tokens: int) -> list[list[StepRow]]:
    """Token-capacity bins: each unit, longest first, into the first bin it fits."""
    bins: list[list[StepRow]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: -sum(len(r.row.input_ids) for r in u)):
        length = sum(len(r.row.input_ids) for r in unit)
        for i, free in enumerate(room):
            if length <= free:
                bins[i].extend(unit)
                room[i] -= length
                break
        else:
            bins.append(list(unit))
            room.append(max_tokens - length)
    return bins


# Measured in BENCHMARKS.md ("Packed rows"): rows of equal length run faster padded.
PACK_ABOVE_PADDING = 0.1


def collate(
    rows: Sequence[StepRow], pad_token_id: int, device: torch.device, packed: bool = False
) -> FusedBatch:
    """The rows as tensors, grouped by job into contiguous segments.

    `packed` packs them unless padding would add at most `PACK_ABOVE_PADDING` of
    their real tokens: then one batched attention call beats one per row.
    """
    job_order = list(dict.fromkeys(r.job for r in rows))
    grouped = sorted(rows, key=lambda r: job_order.index(r.job))
    lengths = [len(r.row.input_ids) for r in grouped]
    seq = max(lengths)
    packed = packed and len(grouped) * seq > (1 + PACK_ABOVE_PADDING) * sum(lengths)
    shape = (1, sum(lengths)) if packed else (len(grouped), seq)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    scale = torch.zeros(shape, dtype=torch.float64)  # exact; each loss casts it to its dtype
    flat_ids, flat_targets, flat_scale = input_ids.view(-1), targets.view(-1), scale.view(-1)
    split_completion = any(r.pair is not None and r.pair.prompt_targets for r in grouped)
    completion = torch.zeros(shape, dtype=torch.float32) if split_completion else None
    row_segment: list[int] = []
    segments: list[Segment] = []
    start = 0
    for s, job in enumerate(job_order):
        members = [r for r in grouped if r.job == job]
        end = start + len(members)
        segments.append(
            Segment(job, start, end, tuple(r.row_id for r in members), tuple(lengths[start:end]))
        )
        row_segment += [s] * len(members)
        start = end
    offset = 0
    for item, length in zip(grouped, lengths, strict=True):
        ids, labels = item.row.input_ids, item.row.labels
        flat_ids[offset : offset + length] = torch.tensor(ids)
        # Position t predicts token t+1 (HF's causal-LM shift, done once here); a row's
        # last position predicts nothing, so packed rows never learn across a boundary.
        if completion is not None:
            trained = torch.tensor([label != IGNORE_INDEX for label in labels[1:]])
            completion.view(-1)[offset : offset + length - 1] = trained.float()
        if item.pair is not None and item.pair.prompt_targets:
            labels = ids  # every token after the first is a target, the prompt's too
        flat_targets[offset : offset + length - 1] = torch.tensor(labels[1:])
        flat_scale[offset : offset + length] = item.loss_scale
        offset += length if packed else seq
    # Padding positions belong to their row's segment; they carry no target and no scale.
    positions_per_row = torch.tensor(lengths if packed else [seq] * len(grouped))
    token_segment = torch.repeat_interleave(torch.tensor(row_segment), positions_per_row)
    token_row = torch.repeat_interleave(torch.arange(len(grouped)), positions_per_row)
    position_ids = None
    if packed:
        position_ids = torch.tensor([p for length in lengths for p in range(length)]).view(1, -1)
    return FusedBatch(
        input_ids=input_ids.to(device),
        position_ids=None if position_ids is None else position_ids.to(device),
        targets=targets.to(device),
        token_scale=scale.to(device),
        token_segment=token_segment.to(device),
        segments=tuple(segments),
        token_row=token_row.to(device),
        rows=tuple(grouped),
        completion=None if completion is None else completion.view(-1).to(device),
    )
