"""Fresh adapters of each kind on a base, drawn from the job's seed alone.

A's values (and AdaLoRA's A and B) come from a generator seeded by the job's seed,
in model order, so the same spec gives the same start wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from carpool.workers.base.base_model import (
    features,
    is_fan_in_fan_out,
    linear_modules,
    match_target_modules,
    weight_dtype,
)
from carpool.workers.spec.lora_patterns import lora_scaling, pattern_value
from carpool.workers.variants.adalora import AdaLoraSchedule, RankAllocator, adalora_weights
from carpool.workers.variants.job_adapter import (
    JobAdapter,
    LoraWeights,
    adapter_dtype,
    initial_magnitude,
)
from carpool.workers.variants.vera import VeraSettings, projections, vera_weights
from torch import nn


def new_job_adapter(
    base: nn.Module,
    name: str,
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool,
    dropout: float,
    target_modules: Sequence[str] | str,
    seed: int,
    freeze_lora_A: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_dora: bool = False,
) -> JobAdapter:
    """A fresh adapter with PEFT's default init: A Kaiming-uniform, B zero (and with DoRA
    the magnitude ||W_i||).

    A's values come from a generator seeded by the job's seed alone, in model
    order, so the same spec gives the same start wherever it runs. Each module
    takes its r and lora_alpha from the patterns where a key matches it.
    """
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    targets = match_target_modules(list(linears), target_modules)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter = JobAdapter(
        name=name,
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        dropout=dropout,
        seed=seed,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_dora=use_dora,
    )
    for mod_name in targets:
        linear = linears[mod_name]
        in_features, out_features = features(linear)
        rank = pattern_value(adapter.rank_pattern, mod_name, r)
        alpha = pattern_value(adapter.alpha_pattern, mod_name, lora_alpha)
        a = torch.empty(rank, in_features, dtype=torch.float32)
        # Same bound as nn.init.kaiming_uniform_(a=sqrt(5)), which PEFT uses.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(out_features, rank, dtype=torch.float32)
        scaling = lora_scaling(alpha, rank, use_rslora)
        magnitude = initial_magnitude(linear) if use_dora else None
        adapter.modules[mod_name] = LoraWeights.beside(
            linear, a, b, index[mod_name], scaling, freeze_lora_A, magnitude
        )
    return adapter


def new_vera_adapter(
    base: nn.Module,
    name: str,
    *,
    r: int,
    dropout: float,
    target_modules: Sequence[str] | str,
    seed: int,
    d_initial: float,
    projection_prng_key: int,
    save_projection: bool,
) -> JobAdapter:
    """A fresh VeRA adapter: PEFT's projections for the key, sized to the largest targeted
    module, and its starting vectors on every targeted module."""
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    targets = match_target_modules(list(linears), target_modules)
    if not targets:
        raise ValueError("target_modules: no module of the base matches")
    shapes = {m: features(linears[m]) for m in targets}
    first = linears[targets[0]]
    max_in = max(i for i, _ in shapes.values())
    max_out = max(o for _, o in shapes.values())
    dtype = adapter_dtype(weight_dtype(first))
    shared = projections(projection_prng_key, r, max_out, max_in, first.weight.device, dtype)
    adapter = JobAdapter(
        name=name,
        r=r,
        lora_alpha=1.0,  # unused by VeRA: its scale is in lambda_b and lambda_d
        use_rslora=False,
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        dropout=dropout,
        seed=seed,
        peft_type="VERA",
        vera=VeraSettings(d_initial, projection_prng_key, save_projection, shared),
    )
    for mod_name in targets:
        in_f, out_f = shapes[mod_name]
        adapter.modules[mod_name] = vera_weights(
            shared, in_f, out_f, d_initial, index[mod_name], is_fan_in_fan_out(linears[mod_name])
        )
    return adapter


def new_adalora_adapter(
    base: nn.Module,
    name: str,
    *,
    lora_alpha: float,
    dropout: float,
    target_modules: Sequence[str] | str,
    seed: int,
    schedule: AdaLoraSchedule,
) -> JobAdapter:
    """A fresh AdaLoRA adapter: init_r SVD triplets per targeted module, A and B drawn in
    model order from a generator seeded by the job's seed, E zero."""
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    targets = match_target_modules(list(linears), target_modules)
    if not targets:
        raise ValueError("target_modules: no module of the base matches")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapter = JobAdapter(
        name=name,
        r=schedule.init_r,
        lora_alpha=lora_alpha,
        use_rslora=False,
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        dropout=dropout,
        seed=seed,
        peft_type="ADALORA",
        adalora=RankAllocator(schedule),
    )
    for mod_name in targets:
        linear = linears[mod_name]
        in_f, out_f = features(linear)
        adapter.modules[mod_name] = adalora_weights(
            in_f,
            out_f,
            schedule.init_r,
            lora_alpha,
            gen,
            index[mod_name],
            linear.weight.device,
            adapter_dtype(weight_dtype(linear)),
            is_fan_in_fan_out(linear),
        )
    return adapter
