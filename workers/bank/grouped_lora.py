"""One LoRA computation per module over every job segment of a micro-batch.

The reference path (`AdapterBank`'s per-segment loop) runs two matmuls per job
segment and module, and about three times that in the backward: on a GPU that
is O(jobs x modules) kernel launches per micro-batch. Here each module runs a
fixed number of operations whatever the number of jobs K:

- the segments' A [r, in] and B [out, r] are stacked into [K, r_pad, in] and
  [K, out, r_pad] (one `stack`, or one `cat` + `index_select` when ranks differ
  or a job does not target the module);
- `bmm`: each row gathers its segment's A and B and two batched matmuls run
  over the rows; `grouped_mm`: `torch._grouped_mm` runs one GEMM per segment
  of tokens in one call, nothing gathered.

Packed micro-batches (one sequence of every row's real tokens) are planned per
token (`plan_packed_group`): `grouped_mm` takes them as they are; `bmm` lays
the segments' tokens out as [segments, longest segment, in] with one
`index_select`, runs the two batched matmuls, and picks the real tokens back.

Padding ranks with zeros is exact. A zero row j of A gives a zero column j of
`h = x A^T`, which meets a zero column j of B in `h B^T`: it adds nothing. In
the backward, dL/dh[:, j] = g B[:, j] = 0, so A's padded row gets a zero
gradient, and dL/dB[:, j] = g^T h[:, j] = 0: the padding neither changes the
output nor any real parameter's gradient (it is not a parameter at all). A job
that does not target the module gets an all-zero block: its rows' delta is 0.

What is still per job: autograd hands each job's parameters their own slice of
the stacked gradient (views; with mixed ranks a copy for B), since the bank
keeps one parameter tensor per job and module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger("carpool.adapter_math")

GroupedMath = Literal["bmm", "grouped_mm"]


def grouped_mm_unsupported(
    dtype: torch.dtype, device: torch.device, in_features: int, out_features: int
) -> str | None:
    """Why `torch._grouped_mm` cannot run this module's LoRA math, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if device.type == "cuda":
        # The CUDA kernel (CUTLASS) takes bfloat16 on sm90+ (torch's meta checks say so).
        if dtype != torch.bfloat16:
            return f"the CUDA _grouped_mm kernel takes bfloat16, the adapters compute in {dtype}"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return "the CUDA _grouped_mm kernel needs compute capability 9.0 or later"
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"_grouped_mm on CPU takes float32, bfloat16 or float16, not {dtype}"
    else:
        return f"no _grouped_mm kernel for {device.type}"
    if (in_features * dtype.itemsize) % 16 or (out_features * dtype.itemsize) % 16:
        return f"_grouped_mm needs 16-byte aligned rows; features {in_features}->{out_features}"
    return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a fallback once per distinct message: never silent, never a flood."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


@dataclass(frozen=True)
class GroupPlan:
    """Index tensors every module with the same segment ranks shares in one route."""

    r_pad: int
    row_segment: torch.Tensor  # [rows] int64: the segment of each row
    token_ends: torch.Tensor  # [segments] int32: cumulative token counts (grouped_mm's offs)
    row_scale: torch.Tensor  # [rows, 1, 1]: each row's job scaling, 0 where untargeted
    # Rows of cat(A..., zero row) per padded rank slot, segment-major; None: a plain stack.
    rank_index: torch.Tensor | None
    # Packed bmm only: each [segment, slot] position's token in cat(x, zero row), the
    # position of each token in that layout, and each segment's scaling as [segments, 1, 1].
    segment_gather: torch.Tensor | None = None
    segment_scatter: torch.Tensor | None = None
    segment_scale: torch.Tensor | None = None


def plan_group(
    ranks: Sequence[int],
    scalings: Sequence[float],
    rows: Sequence[int],
    tokens_per_row: int,
    r_align: int,
    dtype: torch.dtype,
    device: torch.device,
) -> GroupPlan:
    """The plan for segments of `rows` rows with these ranks (0: untargeted) and scalings.

    `r_align` rounds the padded rank up (grouped_mm's 16-byte strides).
    """
    segment_of_row = [s for s, n in enumerate(rows) for _ in range(n)]
    scale_of_row = [scalings[s] if ranks[s] else 0.0 for s in segment_of_row]
    ends, end = [], 0
    for n in rows:
        end += n * tokens_per_row
        ends.append(end)
    return GroupPlan(
        r_pad=_padded_rank(ranks, r_align),
        row_segment=on_device(torch.tensor(segment_of_row), device),
        token_ends=on_device(torch.tensor(ends, dtype=torch.int32), device),
        row_scale=on_device(torch.tensor(scale_of_row, dtype=dtype).view(-1, 1, 1), device),
        rank_index=_rank_index(ranks, _padded_rank(ranks, r_align), device),
    )


def plan_packed_group(
    ranks: Sequence[int],
    scalings: Sequence[float],
    segment_tokens: Sequence[int],
    r_align: int,
    dtype: torch.dtype,
    device: torch.device,
    for_bmm: bool,
) -> GroupPlan:
    """The plan for a packed micro-batch: each token is a "row" of one position.

    `for_bmm` adds the index that lays segments out as [segments, longest, in].
    """
    plan = plan_group(ranks, scalings, segment_tokens, 1, r_align, dtype, device)
    if not for_bmm:
        return plan
    total, longest = sum(segment_tokens), max(segment_tokens)
    gather, scatter, start = [], [], 0
    for s, n in enumerate(segment_tokens):
        gather += list(range(start, start + n)) + [total] * (longest - n)  # total: the zero row
        scatter += range(s * longest, s * longest + n)
        start += n
    scale = [scalings[s] if ranks[s] else 0.0 for s in range(len(ranks))]
    return GroupPlan(
        r_pad=plan.r_pad,
        row_segment=plan.row_segment,
        token_ends=plan.token_ends,
        row_scale=plan.row_scale,
        rank_index=plan.rank_index,
        segment_gather=on_device(torch.tensor(gather), device),
        segment_scatter=on_device(torch.tensor(scatter), device),
        segment_scale=on_device(torch.tensor(scale, dtype=dtype).view(-1, 1, 1), device),
    )


def _padded_rank(ranks: Sequence[int], r_align: int) -> int:
    # At least 1: an AdaLoRA module pruned to no ranks (rank 0) then still gets its all-zero
    # block from the rank index, as a job that does not target the module does.
    return -(-max(*ranks, 1) // r_align) * r_align


def _rank_index(ranks: Sequence[int], r_pad: int, device: torch.device) -> torch.Tensor | None:
    """Rows of cat(A..., zero row) per padded rank slot; None when every rank is r_pad."""
    if all(r == r_pad for r in ranks):
        return None
    zero_row = sum(ranks)
    index, offset = [], 0
    for r in ranks:
        index += [offset + j if j < r else zero_row for j in range(r_pad)]
        offset += r
    return on_device(torch.tensor(index), device)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-made tensor on `device`, without making the host wait for a GPU."""
    # From pinned memory a copy does not wait for the GPU's queue to drain.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def stack_a(a: Sequence[torch.Tensor | None], plan: GroupPlan) -> torch.Tensor:
    """The segments' A [r, in] as [segments, r_pad, in], zero where padded or absent."""
    present = [t for t in a if t is not None]
    if plan.rank_index is None:
        return torch.stack(present)
    rows = torch.cat([*present, present[0].new_zeros(1, present[0].shape[1])])
    return rows.index_select(0, plan.rank_index).view(len(a), plan.r_pad, -1)


def stack_b(b: Sequence[torch.Tensor | None], plan: GroupPlan) -> torch.Tensor:
    """The segments' B [out, r] as [segments, out, r_pad], zero where padded or absent."""
    present = [t for t in b if t is not None]
    if plan.rank_index is None:
        return torch.stack(present)
    cols = torch.cat([*present, present[0].new_zeros(present[0].shape[0], 1)], dim=1)
    return cols.index_select(1, plan.rank_index).view(-1, len(b), plan.r_pad).transpose(0, 1)


@dataclass(frozen=True)
class VectorScales:
    """Per-segment scale vectors beside the plan's one scaling per segment (VeRA's
    lambda_d and lambda_b; ones for other kinds), in x's dtype: `rank` [segments, r_pad]
    scales the rank-r activations (0 where padded or absent), `out` [segments, out]
    the output."""

    rank: torch.Tensor
    out: torch.Tensor


def grouped_delta(
    x: torch.Tensor,
    a: Sequence[torch.Tensor | None],
    b: Sequence[torch.Tensor | None],
    plan: GroupPlan,
    path: GroupedMath,
    vectors: VectorScales | None = None,
) -> torch.Tensor:
    """Every row's `B(A x) * scaling` for its own segment's job: x [rows, ..., in];
    with `vectors`, `out * B(A x * scaling * rank)` instead.

    `a`, `b`: each segment's weights (None where its job does not target the
    module), in x's dtype; dropout is already applied to x.
    """
    rows, in_features = x.shape[0], x.shape[-1]
    x3 = x.reshape(rows, -1, in_features)
    a_stack, b_stack = stack_a(a, plan), stack_b(b, plan)
    if path == "bmm" and plan.segment_gather is not None:
        x2 = torch.cat([x3.reshape(-1, in_features), x3.new_zeros(1, in_features)])
        laid_out = x2.index_select(0, plan.segment_gather).view(len(a), -1, in_features)
        h = torch.bmm(laid_out, a_stack.transpose(1, 2)) * plan.segment_scale
        if vectors is not None:
            h = h * vectors.rank.unsqueeze(1)
        delta = torch.bmm(h, b_stack.transpose(1, 2))  # [segments, longest, out]
        if vectors is not None:
            delta = delta * vectors.out.unsqueeze(1)
        delta = delta.view(-1, delta.shape[-1]).index_select(0, plan.segment_scatter)
    elif path == "bmm":
        a_rows = a_stack.index_select(0, plan.row_segment)  # [rows, r_pad, in]
        # Scale the rank-r activations: the cheapest place to apply it.
        h = torch.bmm(x3, a_rows.transpose(1, 2)) * _row_scale(plan, vectors)
        b_rows = b_stack.index_select(0, plan.row_segment)  # [rows, out, r_pad]
        delta = _out_scaled(torch.bmm(h, b_rows.transpose(1, 2)), plan, vectors)
    else:
        x2 = x3.reshape(-1, in_features)
        h = torch._grouped_mm(x2, a_stack.transpose(1, 2), offs=plan.token_ends)
        h = (h.view(rows, -1, plan.r_pad) * _row_scale(plan, vectors)).view(-1, plan.r_pad)
        delta = torch._grouped_mm(h, b_stack.transpose(1, 2), offs=plan.token_ends)
        delta = _ContiguousGrad.apply(delta)
        if vectors is not None:
            delta = _out_scaled(delta.view(rows, -1, delta.shape[-1]), plan, vectors)
    return delta.view(*x.shape[:-1], -1)


def _row_scale(plan: GroupPlan, vectors: VectorScales | None) -> torch.Tensor:
    """Each row's scale of its rank-r activations: [rows, 1, 1], or [rows, 1, r_pad]."""
    if vectors is None:
        return plan.row_scale
    return plan.row_scale * vectors.rank.index_select(0, plan.row_segment).unsqueeze(1)


def _out_scaled(delta: torch.Tensor, plan: GroupPlan, vectors: VectorScales | None) -> torch.Tensor:
    """[rows, tokens, out] deltas times each row's output scale, if any."""
    if vectors is None:
        return delta
    return delta * vectors.out.index_select(0, plan.row_segment).unsqueeze(1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: `_grouped_mm`'s backward
    refuses broadcast gradients (stride 0, e.g. from `.sum()`)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
