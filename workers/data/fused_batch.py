"""Packing many jobs' step rows into fused micro-batches.

A job's loss is a sum over its trainable tokens divided by their count over
the job's whole optimizer step, so the order of its rows and how they are
split into micro-batches do not change the math. That freedom lets us fill
each micro-batch up to a token budget, then group rows by job inside it so
each job is one segment.

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
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.segment import Segment


@dataclass(frozen=True)
class StepRow:
    """One row of a job's current optimizer step."""

    job: str
    row: TokenizedRow
    row_id: int  # position in the job's data stream
    loss_scale: float  # 1 / trainable tokens in the job's whole step


@dataclass
class FusedBatch:
    input_ids: torch.Tensor  # [rows, seq] right-padded, or [1, tokens] packed; long
    position_ids: torch.Tensor | None  # packed: [1, tokens], restarting per row; padded: None
    targets: torch.Tensor  # like input_ids: the next token, IGNORE_INDEX where untrained
    token_scale: torch.Tensor  # like input_ids, float: each token's job loss scale
    token_segment: torch.Tensor  # [tokens] long, flattened: the segment of each position
    segments: tuple[Segment, ...]

    @property
    def packed(self) -> bool:
        return self.position_ids is not None


def trainable_tokens(row: TokenizedRow) -> int:
    """Positions that contribute to the loss: the label of the next token is trained."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def step_rows(job: str, rows: Sequence[TokenizedRow], row_ids: Sequence[int]) -> list[StepRow]:
    """Tag one job's step rows with the scale that normalizes over the whole step."""
    count = sum(trainable_tokens(r) for r in rows)
    scale = 1.0 / count if count else 0.0
    return [StepRow(job, r, i, scale) for r, i in zip(rows, row_ids, strict=True)]


def plan_micro_batches(
    rows: Sequence[StepRow], max_tokens: int | None, packed: bool = False
) -> list[list[StepRow]]:
    """Split rows into micro-batches of at most `max_tokens` tokens (padded ones, when padded).

    None means one micro-batch. A row longer than the budget goes alone.
    """
    if max_tokens is None or not rows:
        return [list(rows)] if rows else []
    if packed:
        return _first_fit_decreasing(rows, max_tokens)
    ordered = sorted(rows, key=lambda r: len(r.row.input_ids))
    batches: list[list[StepRow]] = []
    current: list[StepRow] = []
    for item in ordered:
        longest = len(item.row.input_ids)  # ascending order: the newcomer is the longest
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


def _first_fit_decreasing(rows: Sequence[StepRow], max_tokens: int) -> list[list[StepRow]]:
    """Token-capacity bins: each row, longest first, into the first bin it fits."""
    bins: list[list[StepRow]] = []
    room: list[int] = []
    for item in sorted(rows, key=lambda r: -len(r.row.input_ids)):
        length = len(item.row.input_ids)
        for i, free in enumerate(room):
            if length <= free:
                bins[i].append(item)
                room[i] -= length
                break
        else:
            bins.append([item])
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
    scale = torch.zeros(shape, dtype=torch.float32)
    flat_ids, flat_targets, flat_scale = input_ids.view(-1), targets.view(-1), scale.view(-1)
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
        flat_targets[offset : offset + length - 1] = torch.tensor(labels[1:])
        flat_scale[offset : offset + length] = item.loss_scale
        offset += length if packed else seq
    # Padding positions belong to their row's segment; they carry no target and no scale.
    token_segment = torch.repeat_interleave(
        torch.tensor(row_segment), torch.tensor(lengths if packed else [seq] * len(grouped))
    )
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
    )
