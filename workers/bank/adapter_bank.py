"""LoRA adapters of many jobs beside one frozen base, routed per row.

The base stays a plain transformers model: no wrapper modules are swapped in,
so DeepSpeed can partition it and PEFT can later load our adapters into it.
Each targeted linear (nn.Linear, or GPT-2's Conv1D) gets a forward hook that adds, for every contiguous
segment of rows belonging to one job, that job's `B(A(dropout(x))) * scaling`:
per segment in a plain loop (the reference), or for all segments at once
(`carpool.workers.bank.grouped_lora`), as the bank's `adapter_math` says. A DoRA
job's term also rescales its rows by its magnitude over the adapted weight's
norm (`carpool.workers.variants.dora`). A VeRA job's modules hold `VeraWeights` instead
(`carpool.workers.variants.vera`), an AdaLoRA job's `AdaLoraWeights` (`carpool.workers.variants.adalora`);
the grouped paths take both as LoRA pairs (`lora_pair`: VeRA's projections with
its vectors as per-rank and per-output scales, AdaLoRA's A * E with its factor), so
one grouped computation covers LoRA, VeRA and AdaLoRA segments alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import carpool.workers.bank.dropout_masks as masks
import torch
import torch.nn.functional as F
from carpool.workers.bank.adapter_math import check_adapter_math, resolve_adapter_math
from carpool.workers.bank.grouped_lora import (
    GroupPlan,
    grouped_delta,
    grouped_mm_unsupported,
    on_device,
    plan_group,
    plan_packed_group,
    warn_once,
)
from carpool.workers.bank.lora_pairs import is_dora, lora_pair, vector_scales
from carpool.workers.base.base_model import features, linear_modules
from carpool.workers.base.quantization import is_4bit
from carpool.workers.data.segment import Segment
from carpool.workers.variants.adalora import AdaLoraWeights, adalora_term
from carpool.workers.variants.dora import base_row_norms_sq, dora_term, weight_norm
from carpool.workers.variants.dylora import DyLoraWeights
from carpool.workers.variants.job_adapter import (
    JobAdapter,
    LoraWeights,
    adapter_dtype,
    out_in_weight,
)
from carpool.workers.variants.sora import SoraWeights
from carpool.workers.variants.vera import VeraWeights, vera_term
from torch import nn


class AdapterBank:
    """Holds the adapters of every job on one base and applies them per row."""

    def __init__(self, base: nn.Module, adapter_math: str = "auto") -> None:
        """`adapter_math`: `loop` (one pair of matmuls per job segment, the reference),
        `bmm` or `grouped_mm` (one computation over all segments; see grouped_lora),
        or `auto`, the path measured fastest on the device."""
        self.base = base
        self.adapter_math = check_adapter_math(adapter_math)
        self.adapters: dict[str, JobAdapter] = {}
        self._linears = linear_modules(base)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._segments: tuple[Segment, ...] | None = None
        self._packed = False
        self._plans: dict[tuple, GroupPlan] = {}  # this route's, shared by modules alike
        self._row_norms_sq: dict[tuple, torch.Tensor] = {}  # DoRA: ||W_i||^2 per module

    # -- membership -----------------------------------------------------------------
    def add(self, adapter: JobAdapter) -> None:
        if adapter.name in self.adapters:
            raise ValueError(f"job {adapter.name!r} already has an adapter on this base")
        self.adapters[adapter.name] = adapter
        self._sync_hooks()

    def remove(self, name: str) -> JobAdapter:
        adapter = self.adapters.pop(name)
        self._sync_hooks()
        return adapter

    def _sync_hooks(self) -> None:
        """Hook exactly the modules some job targets; untargeted ones cost nothing."""
        wanted = {m for a in self.adapters.values() for m in a.modules}
        for name in list(self._hooks):
            if name not in wanted:
                self._hooks.pop(name).remove()
        for name in wanted - set(self._hooks):
            self._hooks[name] = self._linears[name].register_forward_hook(self._make_hook(name))

    # -- routing --------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, segments: Sequence[Segment], packed: bool = False) -> Iterator[None]:
        """Within this block, base forwards apply each segment's job adapter.

        `packed`: the forwards see one sequence [1, tokens] holding every
        segment's rows end to end (each segment's `lengths` say where they are).
        """
        for seg in segments:
            if seg.job not in self.adapters:
                raise KeyError(f"no adapter for job {seg.job!r}")
            if packed and len(seg.lengths) != seg.end - seg.start:
                raise ValueError(f"a packed route needs the row lengths of {seg.job!r}")
        self._segments = tuple(segments)
        self._packed = packed
        try:
            yield
        finally:
            self._segments = None
            self._packed = False
            self._plans = {}

    def _make_hook(self, module_name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._segments is None:
                return output  # plain base forward, e.g. the floor benchmark
            return self._add_lora(module_name, args[0], output)

        return hook

    def _add_lora(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Add each routed job's LoRA (or DoRA) term to its own rows of `output`."""
        weights = [self.adapters[s.job].modules.get(module_name) for s in self._segments]
        if all(w is None for w in weights):
            return output
        lora_dtype = adapter_dtype(x.dtype)  # the LoRA path runs in the adapters' dtype
        path = self._path(module_name, lora_dtype, x.device)
        x = x.to(lora_dtype)
        if self._packed:  # [1, tokens, in]: each token is a row of one position
            x = x.view(-1, 1, x.shape[-1])
        dora = any(is_dora(w) for w in weights)
        if path == "loop":
            delta = self._loop_delta(module_name, weights, x, output)
        elif dora:
            delta = self._grouped_delta_with_dora(module_name, weights, x, output, path)
        else:
            delta = self._grouped_delta(weights, x, path)
        if dora:
            # DoRA's term is built from views of `output`, which autograd saved: not in place.
            return (output + delta.view_as(output)).to(output.dtype)
        # In place is safe and saves a full-size tensor: a linear's backward
        # needs its input, not its output. Adding the adapters' float32 delta
        # to a bf16 output computes in float32 and rounds once, as PEFT does;
        # rounding the delta to bf16 first made 1 in 8 inputs differ from PEFT.
        if self._quantized(module_name):
            # PEFT's Linear4bit rounds the delta to the output's dtype, then adds out of
            # place: bitsandbytes' output may be a view its backward does not expect changed.
            return output + delta.view_as(output).to(output.dtype)
        return output.add_(delta.view_as(output))

    def _quantized(self, module_name: str) -> bool:
        return is_4bit(self._linears[module_name])

    def _path(self, module_name: str, dtype: torch.dtype, device: torch.device) -> str:
        path = resolve_adapter_math(self.adapter_math, device.type)
        if path == "grouped_mm":
            reason = grouped_mm_unsupported(dtype, device, *features(self._linears[module_name]))
            if reason is not None:
                warn_once(f"adapter_math grouped_mm falls back to bmm: {reason}")
                return "bmm"
        return path

    def _segment_sizes(self) -> list[int]:
        """Each segment's length along dim 0 of the hooked input as the bank views it."""
        return [s.tokens if self._packed else s.end - s.start for s in self._segments]

    def _loop_delta(
        self,
        module_name: str,
        weights: list[LoraWeights | VeraWeights | AdaLoraWeights | None],
        x: torch.Tensor,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """The reference: two matmuls per job segment (DoRA's term for DoRA jobs)."""
        # One split and one cat: slicing x per segment would make each slice's
        # backward fill a zero tensor of x's full size (measured: 3x slower), and
        # in-place adds into row slices of `output` cost full-size copies too.
        sizes = self._segment_sizes()
        outs = output.view(*x.shape[:-1], output.shape[-1]).split(sizes)
        parts = []
        for seg, w, xs, out_s in zip(self._segments, weights, x.split(sizes), outs, strict=True):
            if w is None:
                parts.append(xs.new_zeros((*xs.shape[:-1], output.shape[-1])))
            else:
                parts.append(self._segment_term(module_name, seg, w, xs, out_s))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _segment_term(
        self,
        module_name: str,
        seg: Segment,
        w: LoraWeights | VeraWeights | AdaLoraWeights,
        xs: torch.Tensor,
        out_s: torch.Tensor,
    ) -> torch.Tensor:
        """One segment's term: its dropout mask, then LoRA's B A x s or DoRA's term."""
        adapter = self.adapters[seg.job]
        dropped = adapter.dropout > 0 and torch.is_grad_enabled()
        if dropped:
            if self._packed:
                mask = masks.packed_dropout_mask(
                    [(adapter, w.module_index)], [seg], xs.shape[-1], xs
                )
                xs = xs * mask.view_as(xs)
            else:
                xs = xs * masks.dropout_mask(adapter, w.module_index, seg.row_ids, xs.shape, xs)
        if isinstance(w, VeraWeights):
            return vera_term(xs, w)
        if isinstance(w, AdaLoraWeights):
            return adalora_term(xs, w)
        if isinstance(w, SoraWeights):  # B (g ⊙ A x) alpha/r, the official order
            return F.linear(F.linear(xs, w.lora_A) * w.gate * w.scaling, w.lora_B)
        if isinstance(w, DyLoraWeights):  # the step's rank b of its factors
            a, b, scaling = w.factors()
            return F.linear(F.linear(xs, a) * scaling, b)
        if w.magnitude is None:
            # Scale the rank-r activations: the cheapest place to apply it.
            return F.linear(F.linear(xs, w.lora_A) * w.scaling, w.lora_B)
        return self._dora_term(module_name, w, xs, out_s, dropped)

    def _dora_norm(self, module_name: str, w: LoraWeights, dtype: torch.dtype) -> torch.Tensor:
        """||W + s B A|| per output channel of this job's module, detached."""
        weight = out_in_weight(self._linears[module_name])
        key = (module_name, dtype, weight.device)
        row_norms_sq = self._row_norms_sq.get(key)
        if row_norms_sq is None:  # the base is frozen: once per module
            row_norms_sq = self._row_norms_sq[key] = base_row_norms_sq(weight, dtype)
        return weight_norm(weight, row_norms_sq, w.lora_A, w.lora_B, w.scaling)

    def _without_bias(
        self, module_name: str, out: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """W x from the base's output: the output less the module's bias, in `dtype`."""
        bias = self._linears[module_name].bias
        out = out.to(dtype)
        return out if bias is None else out - bias.to(dtype)

    def _dora_term(
        self,
        module_name: str,
        w: LoraWeights,
        xs: torch.Tensor,
        out_s: torch.Tensor,
        dropped: bool,
    ) -> torch.Tensor:
        """DoRA's term of one segment; `out_s` is the base's output for its rows."""
        weight = out_in_weight(self._linears[module_name])
        norm = self._dora_norm(module_name, w, xs.dtype)
        # Without dropout W x is the base's output less its bias: no second matmul.
        base_out = None if dropped else self._without_bias(module_name, out_s, xs.dtype)
        return dora_term(xs, base_out, weight, norm, w.magnitude, w.lora_A, w.lora_B, w.scaling)

    def _grouped_delta_with_dora(
        self,
        module_name: str,
        weights: list[LoraWeights | VeraWeights | AdaLoraWeights | None],
        x: torch.Tensor,
        output: torch.Tensor,
        path: str,
    ) -> torch.Tensor:
        """DoRA beside LoRA in one grouped computation.

        DoRA's term is m/n * (s B A x) + (m/n - 1) * W x: the grouped LoRA terms
        of every segment, scaled per row by m/n (1 for rows of plain LoRA jobs,
        whose term is then left exactly as it was), plus (m/n - 1) times the
        base's output less its bias. A DoRA job with active dropout needs W x' on
        its masked rows, a matmul of its own: its segments go through the loop.
        """
        segments = self._segments
        dora = [is_dora(w) for w in weights]
        if torch.is_grad_enabled() and any(
            d and self.adapters[s.job].dropout > 0 for s, d in zip(segments, dora, strict=True)
        ):
            warn_once(f"adapter_math {path}: DoRA jobs with lora_dropout go through the loop")
            return self._grouped_delta_some_by_segment(module_name, weights, x, output, path)
        lora = self._grouped_delta(weights, x, path)
        out_features = output.shape[-1]
        ones = x.new_ones(out_features)
        scales = torch.stack(
            [
                w.magnitude / self._dora_norm(module_name, w, x.dtype) if d else ones
                for w, d in zip(weights, dora, strict=True)
            ]
        )
        sizes = torch.tensor(self._segment_sizes())
        row_segment = on_device(torch.repeat_interleave(torch.arange(len(sizes)), sizes), x.device)
        scale = scales.index_select(0, row_segment).view(-1, *[1] * (x.dim() - 2), out_features)
        base = output.view(*x.shape[:-1], out_features)
        return scale * lora.view_as(base) + (scale - 1) * self._without_bias(
            module_name, base, x.dtype
        )

    def _grouped_delta_some_by_segment(
        self,
        module_name: str,
        weights: list[LoraWeights | VeraWeights | AdaLoraWeights | None],
        x: torch.Tensor,
        output: torch.Tensor,
        path: str,
    ) -> torch.Tensor:
        """Every segment but DoRA's grouped as usual; DoRA segments one by one, as in the
        loop."""
        plain = [None if is_dora(w) else w for w in weights]
        sizes = self._segment_sizes()
        parts: list[torch.Tensor | None] = [None] * len(weights)
        if any(w is not None for w in plain):
            parts = list(self._grouped_delta(plain, x, path).split(sizes))
        outs = output.view(*x.shape[:-1], output.shape[-1]).split(sizes)
        pieces = zip(self._segments, weights, x.split(sizes), outs, strict=True)
        for i, (seg, w, xs, out_s) in enumerate(pieces):
            if w is not None and plain[i] is None:
                parts[i] = self._segment_term(module_name, seg, w, xs, out_s)
            elif parts[i] is None:
                parts[i] = xs.new_zeros((*xs.shape[:-1], output.shape[-1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _grouped_delta(
        self,
        weights: list[LoraWeights | VeraWeights | AdaLoraWeights | None],
        x: torch.Tensor,
        path: str,
    ) -> torch.Tensor:
        """One computation over all segments (grouped_lora), dropout masked per row first.

        Each segment's job enters as its LoRA pair (`lora_pair`), whatever its kind.
        """
        segments = self._segments
        adapters = [self.adapters[s.job] for s in segments]
        if torch.is_grad_enabled():
            dropped = [
                (a, w.module_index) if w is not None and a.dropout > 0 else None
                for a, w in zip(adapters, weights, strict=True)
            ]
            if any(d is not None for d in dropped):
                if self._packed:
                    mask = masks.packed_dropout_mask(dropped, segments, x.shape[-1], x)
                    x = x * mask.view_as(x)
                else:
                    x = x * masks.segments_dropout_mask(dropped, segments, x.shape, x)
        pairs = [None if w is None else lora_pair(w) for w in weights]
        ranks = tuple(0 if p is None else p.a.shape[0] for p in pairs)
        # Per module, not per job: rank_pattern / alpha_pattern give modules their own.
        scalings = tuple(0.0 if p is None else p.scaling for p in pairs)
        # grouped_mm's strides must be 16-byte multiples: pad ranks to match.
        r_align = 16 // x.element_size() if path == "grouped_mm" else 1
        tokens_per_row = math.prod(x.shape[1:-1])
        key = (ranks, scalings, r_align, tokens_per_row, path, x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None and self._packed:
            plan = self._plans[key] = plan_packed_group(
                ranks,
                scalings,
                [s.tokens for s in segments],
                r_align,
                x.dtype,
                x.device,
                for_bmm=path == "bmm",
            )
        elif plan is None:
            plan = self._plans[key] = plan_group(
                ranks,
                scalings,
                [s.end - s.start for s in segments],
                tokens_per_row,
                r_align,
                x.dtype,
                x.device,
            )
        a = [None if p is None else p.a for p in pairs]
        b = [None if p is None else p.b for p in pairs]
        return grouped_delta(x, a, b, plan, path, vector_scales(pairs, plan))
