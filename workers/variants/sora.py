"""SoRA (Ding et al., EMNLP 2023): a gate over each module's rank components, driven to exact
zeros by a proximal step, so each module keeps the rank it needs.

A module computes h = W0 x + (alpha/r) B (g ⊙ A x). The job's loss adds `sparse_lambda`
times the mean of |g| over all its gate entries. A and B take the job's AdamW; the gates
their own AdamW (at `sparse_lr`, the job's schedule, betas and epsilon, no weight decay)
followed by the proximal soft-threshold of the paper, g ← sign(g)·max(|g| − ξ, 0), with
ξ = `sparse_lambda_2`. (The official code applies three masks in sequence, which zeroes
entries in (ξ, 2ξ) instead of shrinking them.) A module's components with g = 0 are gone:
the export keeps the others only, as plain LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from carpool.workers.variants.job_adapter import JobAdapter, LoraWeights
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


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
        if type(w) is not LoraWeights or w.magnitude is not None:
            raise ValueError(f"{name}: SoRA gates plain LoRA modules only")
        kept = {f.name: getattr(w, f.name) for f in fields(LoraWeights)}
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


class GateOptimizer:
    """The gates' AdamW step, then the proximal soft-threshold by ξ."""

    def __init__(
        self,
        adapter: JobAdapter,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        threshold: float,
        lr_multiplier: Callable[[int], float],
    ) -> None:
        self.gates = gate_parameters(adapter)
        self.threshold = threshold
        self.optimizer = torch.optim.AdamW(
            self.gates, lr=lr, betas=betas, eps=eps, weight_decay=0.0
        )
        self.scheduler = LambdaLR(self.optimizer, lr_multiplier)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        for g in self.gates:
            g.copy_(g.sign() * (g.abs() - self.threshold).clamp(min=0))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": scheduler}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})


def kept_adapter(adapter: JobAdapter) -> tuple[JobAdapter, dict[str, int]]:
    """The trained SoRA adapter as plain LoRA of each module's kept components, the gate and
    alpha/r folded into B in float32 (PEFT's scaling is then 1: each module's r and
    lora_alpha are its kept count), modules with none kept left out; and each module's kept
    rank."""
    copy = JobAdapter(
        name=adapter.name,
        r=adapter.r,
        lora_alpha=adapter.r,
        use_rslora=False,
        target_modules=adapter.target_modules,
        dropout=adapter.dropout,
        seed=adapter.seed,
    )
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
