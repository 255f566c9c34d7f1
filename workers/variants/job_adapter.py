"""One job's adapter weights of every kind, keyed by the base's module names.

`JobAdapter` is what the bank routes rows to, what checkpoints save and what the
PEFT files are written from and read into; the kinds' own weights live beside it
(`variants.vera`, `variants.adalora`). Nothing here knows about batches or training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from carpool.workers.base.base_model import TargetModule, is_fan_in_fan_out, weight_dtype
from carpool.workers.variants.adalora import AdaLoraWeights, RankAllocator
from carpool.workers.variants.vera import LAMBDA_B, LAMBDA_D, VeraSettings, VeraWeights
from torch import nn

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for DoRA's magnitude
GATE = "lora_gate"  # SoRA's gate, in checkpoints (the export folds it into B)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """float32 beside a half-precision base, else the base's own dtype.

    Adapter updates (lr x Adam step, ~1e-5 relative) are below bfloat16's
    resolution, so bf16 adapter weights would silently stop learning; PEFT
    upcasts for the same reason. A float64 base (exact tests) keeps float64.
    """
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


@dataclass
class LoraWeights:
    """One job's adapter on one module, in PEFT's layout."""

    lora_A: nn.Parameter  # [r, in_features]
    lora_B: nn.Parameter  # [out_features, r]
    module_index: int  # position among the base's linears, to seed dropout masks
    scaling: float  # this module's own: its r and lora_alpha may differ from the job's
    fan_in_fan_out: bool = False  # the base module stores its weight [in, out] (Conv1D)
    magnitude: nn.Parameter | None = None  # DoRA's [out_features]; None for plain LoRA

    @classmethod
    def beside(
        cls,
        linear: TargetModule,
        a: torch.Tensor,
        b: torch.Tensor,
        module_index: int,
        scaling: float,
        freeze_lora_A: bool = False,
        magnitude: torch.Tensor | None = None,
    ) -> LoraWeights:
        """Parameters from A, B (and DoRA's magnitude), on the linear's device and in the
        adapters' dtype."""
        w = linear.weight
        dtype = adapter_dtype(weight_dtype(linear))
        return cls(
            nn.Parameter(a.to(device=w.device, dtype=dtype), requires_grad=not freeze_lora_A),
            nn.Parameter(b.to(device=w.device, dtype=dtype)),
            module_index,
            scaling,
            is_fan_in_fan_out(linear),
            None if magnitude is None else nn.Parameter(magnitude.to(device=w.device, dtype=dtype)),
        )


def plain_lora_fields(name: str, w: object, kind: str) -> dict:
    """The fields of a plain LoRA module (no DoRA, no other kind), to rebuild it as `kind`'s
    weights; a ValueError naming the module otherwise."""
    if type(w) is not LoraWeights or w.magnitude is not None:
        raise ValueError(f"{name}: {kind} trains plain LoRA modules only")
    return {f.name: getattr(w, f.name) for f in fields(LoraWeights)}


def out_in_weight(linear: TargetModule) -> torch.Tensor:
    """The module's weight as [out_features, in_features] (Conv1D stores it transposed)."""
    return linear.weight.T if is_fan_in_fan_out(linear) else linear.weight


def initial_magnitude(linear: TargetModule) -> torch.Tensor:
    """DoRA's starting magnitude: ||W + s B A|| per output channel with B = 0, i.e. ||W_i||,
    as PEFT initialises it."""
    with torch.no_grad():
        w = out_in_weight(linear)
        return torch.linalg.norm(w.to(adapter_dtype(w.dtype)), dim=1)


@dataclass
class JobAdapter:
    """All of one job's LoRA weights, keyed by the base's module names.

    `r`, `lora_alpha` and the patterns are as declared, for export; each
    module's own rank is its weights' shape and its scaling is on its weights.
    """

    name: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    dropout: float
    seed: int
    modules: dict[str, LoraWeights | VeraWeights | AdaLoraWeights] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False  # every module then has a magnitude
    peft_type: str = "LORA"  # or "VERA": every module then holds VeraWeights (and so on)
    vera: VeraSettings | None = None  # VeRA's options and shared projections
    adalora: RankAllocator | None = None  # ADALORA: its schedule, scores and rank pattern
    export_ranks: tuple[int, ...] = ()  # DYLORA: the ranks written at export, largest first

    @classmethod
    def without_modules(cls, name: str) -> JobAdapter:
        """A row set that adapts nothing: its rows see the base alone (a reference, or the
        bare base beside adapters)."""
        return cls(name, 0, 1.0, False, (), dropout=0.0, seed=0)

    def empty_lora(self, *, r: int, lora_alpha: float) -> JobAdapter:
        """A plain LoRA adapter, still without modules, with this one's name, targets, dropout
        and seed: what a kind trained otherwise (DyLoRA, SoRA) is exported as."""
        return JobAdapter(
            self.name, r, lora_alpha, False, self.target_modules, self.dropout, self.seed
        )

    @property
    def fan_in_fan_out(self) -> bool:
        """PEFT's flag for adapters on Conv1D modules (it only changes how PEFT merges)."""
        return any(w.fan_in_fan_out for w in self.modules.values())

    def parameters(self) -> list[nn.Parameter]:
        """Every module's A and B, and with DoRA its magnitude (VeRA: its two vectors)."""
        out = []
        for w in self.modules.values():
            if isinstance(w, VeraWeights | AdaLoraWeights):
                out += w.parameters()
                continue
            out += (
                [w.lora_A, w.lora_B] if w.magnitude is None else [w.lora_A, w.lora_B, w.magnitude]
            )
            if getattr(w, "gate", None) is not None:  # SoRA's
                out.append(w.gate)
        return out

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """{"<module>.lora_A": A, "<module>.lora_B": B} (and "<module>.lora_magnitude_vector"
        with DoRA), detached."""
        out = {}
        for name, w in self.modules.items():
            if isinstance(w, VeraWeights):
                out[f"{name}.{LAMBDA_D}"] = w.lambda_d.detach()
                out[f"{name}.{LAMBDA_B}"] = w.lambda_b.detach()
                continue
            if isinstance(w, AdaLoraWeights):
                out[f"{name}.lora_E"] = w.lora_E.detach()
            out[f"{name}.lora_A"] = w.lora_A.detach()
            out[f"{name}.lora_B"] = w.lora_B.detach()
            if getattr(w, "magnitude", None) is not None:
                out[f"{name}.{MAGNITUDE}"] = w.magnitude.detach()
            if getattr(w, "gate", None) is not None:
                out[f"{name}.{GATE}"] = w.gate.detach()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights saved by `named_tensors` into this adapter, in place."""
        expected = set(self.named_tensors())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"adapter tensors do not match: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, w in self.modules.items():
                if isinstance(w, VeraWeights):
                    w.lambda_d.copy_(tensors[f"{name}.{LAMBDA_D}"])
                    w.lambda_b.copy_(tensors[f"{name}.{LAMBDA_B}"])
                    continue
                if isinstance(w, AdaLoraWeights):
                    w.lora_E.copy_(tensors[f"{name}.lora_E"])
                w.lora_A.copy_(tensors[f"{name}.lora_A"])
                w.lora_B.copy_(tensors[f"{name}.lora_B"])
                if getattr(w, "magnitude", None) is not None:
                    w.magnitude.copy_(tensors[f"{name}.{MAGNITUDE}"])
                if getattr(w, "gate", None) is not None:
                    w.gate.copy_(tensors[f"{name}.{GATE}"])
