"""Every kind's term as a LoRA pair, so one grouped computation covers them all.

VeRA enters as its projections with its vectors as per-rank and per-output scales,
AdaLoRA as A * E with its factor, DyLoRA as its factors at the step's rank; DoRA as its
LoRA pair, rescaled by the bank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from carpool.workers.bank.grouped_lora import GroupPlan, VectorScales, stack_a
from carpool.workers.variants.adalora import AdaLoraWeights, adalora_pair
from carpool.workers.variants.dylora import DyLoraWeights
from carpool.workers.variants.job_adapter import LoraWeights
from carpool.workers.variants.sora import SoraWeights
from carpool.workers.variants.vera import VeraWeights


def is_dora(w: LoraWeights | VeraWeights | AdaLoraWeights | None) -> bool:
    return isinstance(w, LoraWeights) and w.magnitude is not None


@dataclass(frozen=True)
class LoraPair:
    """A segment's term in grouped math: `out_scale * B(A x * scaling * rank_scale)`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    rank_scale: torch.Tensor | None = None  # per rank [r] (VeRA's lambda_d)
    out_scale: torch.Tensor | None = None  # per output [out] (VeRA's lambda_b)


def lora_pair(w: LoraWeights | VeraWeights | AdaLoraWeights) -> LoraPair:
    """Any kind's term but DoRA's as a LoRA pair, for grouped math (DoRA's is its LoRA
    pair's term, rescaled: see `_grouped_delta_with_dora`)."""
    if isinstance(w, VeraWeights):
        # lambda_b * B(lambda_d * A x): the loop's order, so float32 rounds alike.
        return LoraPair(w.vera_A, w.vera_B, 1.0, w.lambda_d, w.lambda_b)
    if isinstance(w, AdaLoraWeights):
        return LoraPair(*adalora_pair(w))
    if isinstance(w, SoraWeights):  # its gate scales each rank component
        return LoraPair(w.lora_A, w.lora_B, w.scaling, rank_scale=w.gate)
    if isinstance(w, DyLoraWeights):  # the step's rank b of its factors
        return LoraPair(*w.factors())
    return LoraPair(w.lora_A, w.lora_B, w.scaling)


def vector_scales(pairs: list[LoraPair | None], plan: GroupPlan) -> VectorScales | None:
    """The segments' scale vectors when some segment has them (VeRA, SoRA), else None.

    Segments without get views of one tensor of ones (exact: x * 1 == x), so the
    operations stay as many whatever the number of jobs.
    """
    if all(p is None or (p.out_scale is None and p.rank_scale is None) for p in pairs):
        return None
    some = next(p for p in pairs if p is not None)
    ones = some.b.new_ones(max(some.b.shape[0], plan.r_pad), 1)
    # As [r, 1] "A"s, padded and stacked as A is: [segments, r_pad].
    rank = stack_a(
        [
            None
            if p is None
            else ones[: p.a.shape[0]]
            if p.rank_scale is None
            else p.rank_scale.unsqueeze(1)
            for p in pairs
        ],
        plan,
    )
    out_ones = ones[: some.b.shape[0], 0]
    out = [out_ones if p is None or p.out_scale is None else p.out_scale for p in pairs]
    return VectorScales(rank.squeeze(-1), torch.stack(out))
