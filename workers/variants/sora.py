"""SoRA (Ding et al., EMNLP 2023): a gate over each module's rank components, driven to exact
zeros by a proximal step, so each module keeps the rank it needs.

A module computes h = W0 x + (alpha/r) B (g ⊙ A x). The job's loss adds `sparse_lambda`
times the mean of |g| over all its gate entries. The job's AdamW steps A and B, and the
gates as a group of their own (at `sparse_lr`, no weight decay; the job's schedule, betas
and epsilon), followed by the proximal soft-threshold of the paper, g ← sign(g)·max(|g| − ξ, 0), with
ξ = `sparse_lambda_2`. (The official code applies three masks in sequence, which zeroes
entries in (ξ, 2ξ) instead of shrinking them.) A module's components with g = 0 are gone:
the export keeps the others only, as plain LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from carpool.workers.variants.job_adapter import JobAdapter, LoraWeights, plain_lora_fields
from torch import nn


@dataclass
class SoraWeights(LoraWeights):
    """A SoRA module: LoRA's A [r, in] and B [out, r], and the gate [r] between them."""

    gate: nn.Parameter | None = None

    def kept(self) -> torch.Tensor:
        """The indices of the components whose gate is not zero."""
        return self.gate.detach().nonzero().flatten()


def as_sora(adapter: JobAdapter, gates: Callable[[int], torch.Tensor]) -> JobAdapter:
    """`adapter`, plain LoRA, as SoRA: each module gated by `gates(r)` (its start)."""
    for name, w in adapter.modules.items():
        kept = plain_lora_fields(name, w, "SoRA")
        start = gates(w.lora_A.shape[0]).to(device=w.lora_A.device, dtype=w.lora_A.dtype)
        adapter.modules[name] = SoraWeights(**kept, gate=nn.Parameter(start))
    adapter.peft_type = "SORA"
    return adapter


def normal_gates(seed: int) -> Callable[[int], torch.Tensor]:
    """Gates drawn from a standard normal as the official code starts them, from a
    generator seeded by the job's seed, in module order."""
    gen = torch.Generator().manual_seed(seed)
    return lambda r: torch.randn(r, generator=gen, dtype=torch.float32)


def gate_parameters(adapter: JobAdapter) -> list[nn.Parameter]:
    return [w.gate for w in adapter.modules.values() if isinstance(w, SoraWeights)]


def sparsity_penalty(adapter: JobAdapter, sparse_lambda: float) -> torch.Tensor:
    """`sparse_lambda` times the mean |g| over all the adapter's gate entries."""
    gates = torch.cat([g.view(-1) for g in gate_parameters(adapter)])
    return sparse_lambda * gates.abs().mean()


def kept_rank_share(adapter: JobAdapter) -> float:
    """The kept components over all components (Σ kept / Σ r)."""
    gates = gate_parameters(adapter)
    return sum(int((g != 0).sum()) for g in gates) / sum(g.numel() for g in gates)


@torch.no_grad()
def soft_threshold(adapter: JobAdapter, threshold: float) -> None:
    """The proximal step after the gates' AdamW step: g <- sign(g) max(|g| - threshold, 0)."""
    for g in gate_parameters(adapter):
        g.copy_(g.sign() * (g.abs() - threshold).clamp(min=0))


def kept_adapter(adapter: JobAdapter) -> tuple[JobAdapter, dict[str, int]]:
    """The trained SoRA adapter as plain LoRA of each module's kept components, the gate and
    alpha/r folded into B in float32 (PEFT's scaling is then 1: each module's r and
    lora_alpha are its kept count), modules with none kept left out; and each module's kept
    rank."""
    copy = adapter.empty_lora(r=adapter.r, lora_alpha=adapter.r)  # patterns per module below
    ranks: dict[str, int] = {}
    for name, w in adapter.modules.items():
        keep = w.kept()
        ranks[name] = len(keep)
        if not len(keep):
            continue
        folded = w.lora_B.detach().float()[:, keep] * (w.gate.detach().float()[keep] * w.scaling)
        copy.modules[name] = LoraWeights(
            w.lora_A.detach()[keep],
            folded.to(w.lora_B.dtype),
            w.module_index,
            1.0,
            w.fan_in_fan_out,
        )
        copy.rank_pattern[name] = len(keep)
        copy.alpha_pattern[name] = float(len(keep))
    return copy, ranks
