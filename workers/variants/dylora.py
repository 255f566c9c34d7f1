"""DyLoRA (Valipour et al., EACL 2023): one adapter trained to be good at every rank up to r.

Each optimizer step draws one rank b uniformly from 1..r (one b for the job's modules and
micro-batches of that step), from a generator seeded by the job's seed and step alone, so
a resumed or re-split job draws the same b. The step's forward uses A[:b] and B[:, :b] with
scaling alpha/b (the official code's sqrt(r/b) on each factor, times PEFT's alpha/r). In
the default frozen mode only row b-1 of A and column b-1 of B receive gradient (the lower
ranks are detached); AdamW still runs over the whole tensors, as in the official code.
Outside a training step (evaluation, inference, export) the adapter is at its full rank r.
A rank b of the trained adapter is plain LoRA: A[:b], B[:, :b], r=b and the same alpha.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from carpool.workers.variants.job_adapter import JobAdapter, LoraWeights, plain_lora_fields


@dataclass
class DyLoraWeights(LoraWeights):
    """A DyLoRA module: LoRA's A [r, in] and B [out, r], trained one drawn rank at a time."""

    lora_alpha: float = 1.0
    frozen: bool = True  # the lower ranks are detached during a step
    rank: int | None = None  # the step's drawn rank b; None outside a step: every rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A[:b], B[:, :b], alpha / b) of the current rank, the lower ranks detached in
        frozen mode while a graph is being built."""
        b = self.rank or self.lora_A.shape[0]
        a, up = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and b > 1 and torch.is_grad_enabled():
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]])
            up = torch.cat([up[:, : b - 1].detach(), up[:, b - 1 :]], dim=1)
        return a, up, self.lora_alpha / b


def as_dylora(adapter: JobAdapter, *, frozen: bool, export_ranks: Sequence[int]) -> JobAdapter:
    """`adapter`, plain LoRA of rank r on every module, trained as DyLoRA from here on.
    Raises ValueError for anything else (a rank pattern, DoRA)."""
    for name, w in adapter.modules.items():
        kept = plain_lora_fields(name, w, "DyLoRA")
        if w.lora_A.shape[0] != adapter.r:
            raise ValueError(f"{name} has rank {w.lora_A.shape[0]}; DyLoRA needs r={adapter.r}")
        adapter.modules[name] = DyLoraWeights(**kept, lora_alpha=adapter.lora_alpha, frozen=frozen)
    adapter.peft_type = "DYLORA"
    adapter.export_ranks = tuple(sorted(set(export_ranks), reverse=True))
    return adapter


def at_rank(adapter: JobAdapter, b: int) -> JobAdapter:
    """Rank b of a DyLoRA adapter as plain LoRA (A[:b], B[:, :b], r=b, the same alpha)."""
    copy = adapter.empty_lora(r=b, lora_alpha=adapter.lora_alpha)
    for name, w in adapter.modules.items():
        copy.modules[name] = LoraWeights(
            w.lora_A.detach()[:b],
            w.lora_B.detach()[:, :b],
            w.module_index,
            adapter.lora_alpha / b,
            w.fan_in_fan_out,
        )
    return copy


def drawn_rank(seed: int, step: int, r: int) -> int:
    """The rank b in 1..r that step `step` of a job seeded `seed` trains."""
    key = hashlib.blake2b(f"dylora:{seed}:{step}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    return int(torch.randint(1, r + 1, (1,), generator=gen))


def set_rank(modules: dict, rank: int | None) -> None:
    """Every DyLoRA module of an adapter at `rank` (None: the full rank)."""
    for w in modules.values():
        if isinstance(w, DyLoraWeights):
            w.rank = rank
