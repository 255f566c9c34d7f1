"""DoRA's per-output-channel weight norm and forward term, as PEFT's `DoraLinearLayer`.

DoRA (https://huggingface.co/papers/2402.09353) rescales each output channel of
the adapted weight W + s*B@A to a trained magnitude m:

    y = m / ||W + s B A||_row * (W x + s B A x) + bias

The norm is detached from the graph (the paper's section 4.3; PEFT does the
same). It is computed without building the [out, in] matrix per job:

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

where ||W_i||^2 is the frozen base's, computed once per module, and W A^T is
[out, r]: one small matmul per job and module instead of a full-size weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_row_norms_sq(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||W_i||^2 per output channel of a frozen [out, in] weight, in `dtype`."""
    with torch.no_grad():
        w = weight.to(dtype)
        return (w * w).sum(dim=1)


def weight_norm(
    weight: torch.Tensor,
    row_norms_sq: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """||W + scaling * B @ A|| per output channel, [out], detached.

    `weight` is [out, in]; `row_norms_sq` its `base_row_norms_sq`.
    """
    with torch.no_grad():
        a, b = lora_A.detach(), lora_B.detach()
        wa = F.linear(weight.to(a.dtype), a)  # [out, r]
        cross = (wa * b).sum(dim=1)
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)
        # clamp: rounding may take an exactly-zero row a hair below zero
        squared = row_norms_sq + (2 * scaling) * cross + (scaling * scaling) * quad
        return squared.clamp_min(0).sqrt()


def dora_term(
    x: torch.Tensor,
    base_out: torch.Tensor | None,
    weight: torch.Tensor,
    norm: torch.Tensor,
    magnitude: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """What DoRA adds to the base's output for inputs `x` ([..., in] -> [..., out]).

    PEFT's: (m/n - 1) * W x' + m/n * s B A x', where x' is x after dropout.
    Without dropout W x' is `base_out`, the base's output less its bias (no
    second matmul); with it (`x` already masked, `base_out` None) PEFT
    recomputes W x' on the masked input, and so does this.
    """
    scale = magnitude / norm  # [out]; the norm carries no gradient
    direction = F.linear(x, weight.to(x.dtype)) if base_out is None else base_out
    lora = F.linear(F.linear(x, lora_A) * scaling, lora_B)
    return (scale - 1) * direction + scale * lora
