"""VeRA's per-module weights and forward term, as PEFT's `VeraLayer`.

VeRA (https://huggingface.co/papers/2310.11454) freezes one pair of random
projections shared by every adapted module, A [r, max_in] and B [max_out, r],
and trains two vectors per module: lambda_d [r] and lambda_b [out]:

    y = W x + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x)))

The projections come from a CPU generator seeded by `projection_prng_key`,
exactly as PEFT draws them, so an exported adapter needs only the vectors.
Jobs with the same key, r and shapes share one copy of the projections.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAMBDA_D = "vera_lambda_d"  # PEFT's names for the trained vectors
LAMBDA_B = "vera_lambda_b"


@dataclass(eq=False)
class Projections:
    """The frozen shared pair: vera_A [r, max_in], vera_B [max_out, r]."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor


_CACHE: weakref.WeakValueDictionary[tuple, Projections] = weakref.WeakValueDictionary()


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: uniform in +-sqrt(6 / fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def projections(
    key: int, r: int, max_out: int, max_in: int, device: torch.device, dtype: torch.dtype
) -> Projections:
    """The projections PEFT builds for `projection_prng_key` = `key`, shared while in use."""
    cache_key = (key, r, max_out, max_in, torch.device(device), dtype)
    found = _CACHE.get(cache_key)
    if found is None:
        gen = torch.Generator(device="cpu").manual_seed(key)
        a = _kaiming_uniform((r, max_in), gen)  # A first: the same draws as PEFT
        b = _kaiming_uniform((max_out, r), gen)
        found = Projections(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        _CACHE[cache_key] = found
    return found


@dataclass
class VeraSettings:
    """A VeRA job's own options (PEFT's VeraConfig names) and its projections."""

    d_initial: float
    projection_prng_key: int
    save_projection: bool
    shared: Projections


@dataclass
class VeraWeights:
    """One job's VeRA vectors on one module, with views of the shared projections."""

    vera_A: torch.Tensor  # [r, in]: a frozen slice of the shared A
    vera_B: torch.Tensor  # [out, r]
    lambda_d: nn.Parameter  # [r]
    lambda_b: nn.Parameter  # [out]
    module_index: int  # position among the base's linears, to seed dropout masks
    fan_in_fan_out: bool = False

    def parameters(self) -> list[nn.Parameter]:
        return [self.lambda_d, self.lambda_b]


def vera_weights(
    shared: Projections,
    in_features: int,
    out_features: int,
    d_initial: float,
    module_index: int,
    fan_in_fan_out: bool = False,
) -> VeraWeights:
    """Fresh vectors as PEFT initialises them: lambda_d = d_initial, lambda_b = 0."""
    a = shared.vera_A
    return VeraWeights(
        a[:, :in_features],
        shared.vera_B[:out_features, :],
        nn.Parameter(torch.full((a.shape[0],), float(d_initial), dtype=a.dtype, device=a.device)),
        nn.Parameter(torch.zeros(out_features, dtype=a.dtype, device=a.device)),
        module_index,
        fan_in_fan_out,
    )


def vera_term(x: torch.Tensor, w: VeraWeights) -> torch.Tensor:
    """What VeRA adds to the base's output for (dropped-out) inputs `x`, in PEFT's order."""
    return w.lambda_b * F.linear(w.lambda_d * F.linear(x, w.vera_A), w.vera_B)


def vera_parameter_count(shapes: list[tuple[int, int]], r: int) -> tuple[int, int]:
    """(trained vector entries, shared projection entries) for modules of [in, out] shapes."""
    vectors = sum(r + out for _, out in shapes)
    if not shapes:
        return 0, 0
    max_in, max_out = max(i for i, _ in shapes), max(o for _, o in shapes)
    return vectors, r * (max_in + max_out)
