"""LoRA dropout masks that depend on (job seed, row, module, position, feature) alone.

A row's mask never changes with its neighbours, its micro-batch, the batch
layout (padded or packed) or the rank it runs on: so a job's adapter does not
either. On CPU each row's mask comes from a generator seeded by the row; on an
accelerator from a counter-based hash computed there (`hashed_keep_mask`).
Both are prefix-stable: a longer row only extends the mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from carpool.workers.bank.grouped_lora import on_device

if TYPE_CHECKING:
    from carpool.workers.data.segment import Segment
    from carpool.workers.variants.job_adapter import JobAdapter


def row_seed(adapter: JobAdapter, row_id: int, module_index: int) -> int:
    """A 63-bit seed of (job seed, row id, module): the only inputs a row's mask has."""
    key = f"{adapter.seed}:{row_id}:{module_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def dropout_mask(
    adapter: JobAdapter,
    module_index: int,
    row_ids: Sequence[int],
    shape: torch.Size,
    like: torch.Tensor,
) -> torch.Tensor:
    """Inverted-dropout mask for a segment, [rows, seq, in_features], in `like`'s dtype.

    Each row's mask depends only on its seed (job seed, row id, module) and is
    prefix-stable: a longer padded batch only extends it, so padding and batch
    composition never change it. On CPU it comes from a per-row generator; on
    an accelerator from a counter-based hash computed there, since generating
    [rows, seq, features] numbers on the host and copying them over would cost
    more than the LoRA matmuls it masks.
    """
    seeds = [row_seed(adapter, row_id, module_index) for row_id in row_ids]
    keep = 1.0 - adapter.dropout
    if like.device.type == "cpu":
        _, seq_len, features = shape
        masks = []
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            masks.append(torch.rand(seq_len, features, generator=gen) < keep)
        kept = torch.stack(masks)
    else:
        kept = hashed_keep_mask(seeds, shape, keep, like.device)
    return kept.to(dtype=like.dtype) / keep


_U32 = 0xFFFFFFFF


def hashed_keep_mask(
    seeds: Sequence[int],
    shape: torch.Size,
    keep: float | Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """Bernoulli(keep) of [rows, seq, features] from a hash of (row seed, element index).

    Each element is hashed on its own (a 32-bit integer mixer, in int64 so that
    no product overflows), so the values of a position never depend on the
    tensor's size: the mask is prefix-stable and identical on every device.
    `keep` is one probability for all rows or one per row.
    """
    _, seq_len, features = shape
    index = torch.arange(seq_len * features, dtype=torch.int64, device=device)
    row_keys = on_device(torch.tensor([s & _U32 for s in seeds], dtype=torch.int64), device)
    h = ((index.view(1, -1) * 0x9E3779B1) & _U32) ^ row_keys.view(-1, 1)
    for multiplier in (0x7FEB352D, 0x68E31DA5):  # odd and below 2**31: products fit in int64
        h ^= h >> 16
        h = (h * multiplier) & _U32
    h ^= h >> 15
    if isinstance(keep, float):
        threshold = int(keep * (1 << 24))
    else:
        threshold = on_device(torch.tensor([int(k * (1 << 24)) for k in keep]), device).view(-1, 1)
    return ((h >> 8) < threshold).view(len(seeds), seq_len, features)


def segments_dropout_mask(
    dropped: Sequence[tuple[JobAdapter, int] | None],
    segments: Sequence[Segment],
    shape: torch.Size,
    like: torch.Tensor,
) -> torch.Tensor:
    """The inverted-dropout mask of all rows, [rows, seq, features], in `like`'s dtype.

    `dropped` gives per segment its (adapter, module index), or None for rows
    kept whole. Every segment's rows get exactly `dropout_mask`'s values. On an
    accelerator it is one hashed mask over all rows (per-row keep), not one per job.
    """
    if like.device.type != "cpu":
        return hashed_segments_mask(dropped, segments, shape, like)
    parts = []
    for seg, d in zip(segments, dropped, strict=True):
        seg_shape = torch.Size([seg.end - seg.start, *shape[1:]])
        if d is None:
            parts.append(like.new_ones(()).expand(seg_shape))
        else:
            parts.append(dropout_mask(d[0], d[1], seg.row_ids, seg_shape, like))
    return torch.cat(parts)


def hashed_segments_mask(
    dropped: Sequence[tuple[JobAdapter, int] | None],
    segments: Sequence[Segment],
    shape: torch.Size,
    like: torch.Tensor,
) -> torch.Tensor:
    """`segments_dropout_mask` on an accelerator: one `hashed_keep_mask` for all rows."""
    seeds, keeps = _row_seeds_and_keeps(dropped, segments)
    return _hashed_mask(seeds, keeps, shape, like)


def _row_seeds_and_keeps(
    dropped: Sequence[tuple[JobAdapter, int] | None], segments: Sequence[Segment]
) -> tuple[list[int], list[float]]:
    """Each row's seed and keep probability (1.0, every element kept, where not dropped)."""
    seeds: list[int] = []
    keeps: list[float] = []
    for seg, d in zip(segments, dropped, strict=True):
        if d is None:
            seeds += [0] * (seg.end - seg.start)
            keeps += [1.0] * (seg.end - seg.start)
        else:
            adapter, module_index = d
            seeds += [row_seed(adapter, row_id, module_index) for row_id in seg.row_ids]
            keeps += [1.0 - adapter.dropout] * (seg.end - seg.start)
    return seeds, keeps


def _hashed_mask(
    seeds: Sequence[int], keeps: Sequence[float], shape: torch.Size, like: torch.Tensor
) -> torch.Tensor:
    kept = hashed_keep_mask(seeds, shape, keeps, like.device)
    keep = on_device(torch.tensor(keeps, dtype=like.dtype), like.device)
    return kept.to(dtype=like.dtype) / keep.view(-1, 1, 1)


def packed_dropout_mask(
    dropped: Sequence[tuple[JobAdapter, int] | None],
    segments: Sequence[Segment],
    features: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """`segments_dropout_mask` for a packed micro-batch: [tokens, features].

    Each row's mask is the first `length` positions of its padded mask (the
    masks are prefix-stable), so packing never changes a row's mask.
    """
    if like.device.type == "cpu":
        parts = []
        for seg, d in zip(segments, dropped, strict=True):
            for row_id, length in zip(seg.row_ids, seg.lengths, strict=True):
                shape = torch.Size([1, length, features])
                if d is None:
                    parts.append(like.new_ones(()).expand(length, features))
                else:
                    parts.append(dropout_mask(d[0], d[1], [row_id], shape, like)[0])
        return torch.cat(parts)
    return hashed_packed_mask(dropped, segments, features, like)


def hashed_packed_mask(
    dropped: Sequence[tuple[JobAdapter, int] | None],
    segments: Sequence[Segment],
    features: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """`packed_dropout_mask` on an accelerator: one hashed mask over the rows, padded,
    then its real positions picked out."""
    lengths = [n for seg in segments for n in seg.lengths]
    longest = max(lengths)
    seeds, keeps = _row_seeds_and_keeps(dropped, segments)
    padded = _hashed_mask(seeds, keeps, torch.Size([len(lengths), longest, features]), like)
    real = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)])
    return padded.view(-1, features).index_select(0, on_device(real, like.device))
