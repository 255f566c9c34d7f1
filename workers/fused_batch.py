"""Packing many jobs' step rows into fused micro-batches.

A job's loss is a sum over its trainable tokens divided by their count over
the job's whole optimizer step, so the order of its rows and how they are
split into micro-batches do not change the math. That freedom lets us sort
rows by length (little padding) and fill each micro-batch up to a token
budget, then group rows by job inside it so each job is one segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from carpool.workers.adapter_bank import Segment
from carpool.workers.dataset import IGNORE_INDEX, TokenizedRow


@dataclass(frozen=True)
class StepRow:
    """One row of a job's current optimizer step."""

    job: str
    row: TokenizedRow
    row_id: int  # position in the job's data stream
    loss_scale: float  # 1 / trainable tokens in the job's whole step


@dataclass
class FusedBatch:
    input_ids: torch.Tensor  # [rows, seq] long, right-padded
    targets: torch.Tensor  # [rows, seq] long: next token, IGNORE_INDEX where untrained
    row_scale: torch.Tensor  # [rows] float: each row's job loss scale
    segments: tuple[Segment, ...]


def trainable_tokens(row: TokenizedRow) -> int:
    """Positions that contribute to the loss: the label of the next token is trained."""
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def step_rows(job: str, rows: Sequence[TokenizedRow], row_ids: Sequence[int]) -> list[StepRow]:
    """Tag one job's step rows with the scale that normalizes over the whole step."""
    count = sum(trainable_tokens(r) for r in rows)
    scale = 1.0 / count if count else 0.0
    return [StepRow(job, r, i, scale) for r, i in zip(rows, row_ids, strict=True)]


def plan_micro_batches(rows: Sequence[StepRow], max_tokens: int | None) -> list[list[StepRow]]:
    """Split rows into micro-batches of at most `max_tokens` padded tokens.

    None means one micro-batch. A row longer than the budget goes alone.
    """
    if max_tokens is None or not rows:
        return [list(rows)] if rows else []
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


def collate(rows: Sequence[StepRow], pad_token_id: int, device: torch.device) -> FusedBatch:
    """Right-pad the rows into tensors, grouped by job into contiguous segments."""
    job_order = list(dict.fromkeys(r.job for r in rows))
    grouped = sorted(rows, key=lambda r: job_order.index(r.job))
    seq = max(len(r.row.input_ids) for r in grouped)
    n = len(grouped)
    input_ids = torch.full((n, seq), pad_token_id, dtype=torch.long)
    targets = torch.full((n, seq), IGNORE_INDEX, dtype=torch.long)
    scale = torch.empty(n, dtype=torch.float32)
    for i, item in enumerate(grouped):
        ids, labels = item.row.input_ids, item.row.labels
        input_ids[i, : len(ids)] = torch.tensor(ids)
        # Position t predicts token t+1 (HF's causal-LM shift, done once here).
        targets[i, : len(ids) - 1] = torch.tensor(labels[1:])
        scale[i] = item.loss_scale
    segments, start = [], 0
    for job in job_order:
        members = [r for r in grouped if r.job == job]
        end = start + len(members)
        segments.append(Segment(job, start, end, tuple(r.row_id for r in members)))
        start = end
    return FusedBatch(
        input_ids=input_ids.to(device),
        targets=targets.to(device),
        row_scale=scale.to(device),
        segments=tuple(segments),
    )
