"""AdaLoRA's per-module weights, regularizer and rank allocator, as PEFT's.

AdaLoRA (https://openreview.net/forum?id=lq62uWRJjiY) trains each module's
update in SVD form, P diag(E) Q, and prunes the least important singular
values to a shrinking budget:

    y = W x + (B @ (A * E) @ x) * lora_alpha / (init_r + 1e-5)

with A [r, in], E [r, 1], B [out, r] (PEFT's `SVDLinear`; the divisor stays
init_r after pruning). The loss gets orth_reg_weight times the mean over A and
B of ||P P^T - I||_F, and after each optimizer step the allocator (PEFT's
`RankAllocator`) updates importance EMAs of |p * grad| and zeroes E entries
under the budget's threshold. Budget, scores and mask are per job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from carpool.workers.spec.job_spec import AdapterSpec


@dataclass
class AdaLoraWeights:
    """One job's SVD-form adapter on one module."""

    lora_A: nn.Parameter  # [r, in]: right singular vectors
    lora_E: nn.Parameter  # [r, 1]: singular values
    lora_B: nn.Parameter  # [out, r]: left singular vectors
    lora_alpha: float
    ranknum: float  # init_r: PEFT divides by it even after pruning
    module_index: int  # position among the base's linears, to seed dropout masks
    fan_in_fan_out: bool = False

    def parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_E, self.lora_B]


def adalora_weights(
    in_features: int,
    out_features: int,
    init_r: int,
    lora_alpha: float,
    gen: torch.Generator,
    module_index: int,
    device: torch.device,
    dtype: torch.dtype,
    fan_in_fan_out: bool = False,
) -> AdaLoraWeights:
    """PEFT's `reset_lora_parameters`: E zero, A and B normal with std 0.02 (A drawn first)."""
    a = torch.empty(init_r, in_features).normal_(0.0, 0.02, generator=gen)
    b = torch.empty(out_features, init_r).normal_(0.0, 0.02, generator=gen)
    return AdaLoraWeights(
        nn.Parameter(a.to(device=device, dtype=dtype)),
        nn.Parameter(torch.zeros(init_r, 1, device=device, dtype=dtype)),
        nn.Parameter(b.to(device=device, dtype=dtype)),
        float(lora_alpha),
        float(init_r),
        module_index,
        fan_in_fan_out,
    )


def adalora_term(x: torch.Tensor, w: AdaLoraWeights) -> torch.Tensor:
    """What AdaLoRA adds to the base's output for (dropped-out) inputs `x`, in PEFT's order."""
    scaling = w.lora_alpha if w.lora_alpha > 0 else w.ranknum
    return F.linear(F.linear(x, w.lora_A * w.lora_E), w.lora_B) * scaling / (w.ranknum + 1e-5)


def adalora_pair(w: AdaLoraWeights) -> tuple[torch.Tensor, torch.Tensor, float]:
    """AdaLoRA's term as a LoRA pair (A', B', scaling): A * E, B and PEFT's factor.

    A * E is built anew each forward (as `adalora_term` does), so that grouped
    math sends gradients to A and E; pruned ranks are zero rows of it.
    """
    scaling = w.lora_alpha if w.lora_alpha > 0 else w.ranknum
    return w.lora_A * w.lora_E, w.lora_B, scaling / (w.ranknum + 1e-5)


def orthogonality_loss(modules: dict[str, AdaLoraWeights]) -> torch.Tensor:
    """PEFT's regularizer: the mean over every A and B of ||P P^T - I||_F (not squared)."""
    norms = []
    for w in modules.values():
        for cov in (w.lora_A @ w.lora_A.T, w.lora_B.T @ w.lora_B):
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            norms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    return torch.stack(norms).sum() / len(norms)


@dataclass(frozen=True)
class AdaLoraSchedule:
    """PEFT's AdaLoraConfig fields the allocator reads."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    deltaT: int  # noqa: N815 (PEFT's name)
    beta1: float
    beta2: float
    orth_reg_weight: float
    total_step: int


def schedule_of(spec: AdapterSpec) -> AdaLoraSchedule:
    """The schedule of an ADALORA adapter section (validation ensured total_step)."""
    assert spec.total_step is not None
    return AdaLoraSchedule(
        spec.init_r,
        spec.target_r,
        spec.tinit,
        spec.tfinal,
        spec.deltaT,
        spec.beta1,
        spec.beta2,
        spec.orth_reg_weight,
        spec.total_step,
    )


_KINDS = ("lora_A", "lora_E", "lora_B")


@dataclass
class RankAllocator:
    """One job's importance EMAs and rank pattern (PEFT's `RankAllocator` per adapter)."""

    schedule: AdaLoraSchedule
    exp_avg_ipt: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module>.lora_A" ->
    exp_avg_unc: dict[str, torch.Tensor] = field(default_factory=dict)
    # "<module>.lora_E" -> kept ranks, once a mask was applied (PEFT's config.rank_pattern)
    rank_pattern: dict[str, list[bool]] | None = None
    # Started from a saved adapter (init_from): its modules hold the kept ranks only and
    # `rank_pattern` is the saved one. PEFT's allocator cannot continue such an adapter (see
    # `carpool.workers.peft_files.adalora_format`), so nothing is scored or pruned: the ranks stay fixed.
    fixed: bool = False

    def budget(self, modules: dict[str, AdaLoraWeights], step: int) -> tuple[int, bool]:
        """(rank budget, whether to mask) at `step`: a cubic fall from the initial total to
        target_r per module between tinit and total_step - tfinal, masking every deltaT."""
        s = self.schedule
        init_bgt = sum(w.lora_A.shape[0] for w in modules.values())
        target_bgt = s.target_r * len(modules)
        if step <= s.tinit:
            return init_bgt, False
        if step > s.total_step - s.tfinal:
            return target_bgt, True
        mul = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % s.deltaT == 0

    @torch.no_grad()
    def _update_ipt(self, modules: dict[str, AdaLoraWeights]) -> None:
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for name, w in modules.items():
            for kind, p in zip(_KINDS, w.parameters(), strict=True):
                key = f"{name}.{kind}"
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                ipt = (p * p.grad).abs()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                self.exp_avg_unc[key] = (
                    b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()
                )

    @torch.no_grad()
    def _mask_to_budget(self, modules: dict[str, AdaLoraWeights], budget: int) -> None:
        scores = {}
        for name in modules:
            score = {
                k: self.exp_avg_ipt[f"{name}.{k}"] * self.exp_avg_unc[f"{name}.{k}"] for k in _KINDS
            }
            a = score["lora_A"].mean(dim=1, keepdim=True)
            b = score["lora_B"].mean(dim=0).view(-1, 1)
            scores[name] = score["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
        init_bgt = sum(w.lora_A.shape[0] for w in modules.values())
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=init_bgt - budget)[0].item()
        self.rank_pattern = {}
        for name, w in modules.items():
            pruned = scores[name].view(-1, 1) <= threshold
            w.lora_E.masked_fill_(pruned, 0.0)
            self.rank_pattern[f"{name}.lora_E"] = (~pruned).view(-1).tolist()

    @torch.no_grad()
    def _mask_with_pattern(self, modules: dict[str, AdaLoraWeights]) -> None:
        assert self.rank_pattern is not None
        for name, w in modules.items():
            keep = torch.tensor(self.rank_pattern[f"{name}.lora_E"], device=w.lora_E.device)
            w.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, modules: dict[str, AdaLoraWeights], step: int) -> None:
        """PEFT's `AdaLoraModel.update_and_allocate(step)`: after the optimizer step,
        before zero_grad, with `step` counted from 0."""
        if self.fixed:
            return
        final = self.schedule.total_step - self.schedule.tfinal
        if step < final:
            self._update_ipt(modules)
            budget, mask = self.budget(modules, step)
            if mask:
                self._mask_to_budget(modules, budget)
        elif step == final:
            self._mask_to_budget(modules, self.budget(modules, step)[0])
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        else:
            self._mask_with_pattern(modules)

    def state_dict(self) -> dict:
        return {
            "exp_avg_ipt": dict(self.exp_avg_ipt),
            "exp_avg_unc": dict(self.exp_avg_unc),
            "rank_pattern": self.rank_pattern,
        }

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt = dict(state["exp_avg_ipt"])
        self.exp_avg_unc = dict(state["exp_avg_unc"])
        self.rank_pattern = state["rank_pattern"]


def adalora_parameter_count(shapes: list[tuple[int, int]], init_r: int) -> int:
    """Trained entries of A, E and B over modules of [in, out] shapes."""
    return sum(init_r * (i + 1 + o) for i, o in shapes)
