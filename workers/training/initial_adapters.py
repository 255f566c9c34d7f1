"""Each adapter kind's start for a job: fresh (drawn from the job's seed) or read from
`init_from`, as the job's spec says."""

from __future__ import annotations

import torch
from carpool.workers.peft_files.adalora_format import (
    adalora_adapter_from_loaded,
    read_adalora_adapter,
)
from carpool.workers.peft_files.peft_format import adapter_from_loaded, read_adapter
from carpool.workers.peft_files.vera_format import read_vera_adapter, vera_adapter_from_loaded
from carpool.workers.spec.job_spec import JobSpec
from carpool.workers.variants.adalora import schedule_of
from carpool.workers.variants.dylora import as_dylora
from carpool.workers.variants.job_adapter import JobAdapter
from carpool.workers.variants.new_adapters import (
    new_adalora_adapter,
    new_job_adapter,
    new_vera_adapter,
)
from carpool.workers.variants.sora import as_sora, normal_gates
from torch import nn


def initial_adapter(base: nn.Module, config: JobSpec, *, zero_stage: int = 0) -> JobAdapter:
    """A job's adapter at its start, of its kind: fresh from its seed, or read from
    `init_from` (checked against `base`)."""
    a = config.adapter
    if a.peft_type in ("DYLORA", "SORA"):  # a LoRA of rank r, fresh or read, trained so
        lora = config.model_copy(update={"adapter": a.model_copy(update={"peft_type": "LORA"})})
        adapter = initial_adapter(base, lora, zero_stage=zero_stage)
        if a.peft_type == "SORA":  # gates drawn as the official code, or 1: the saved adapter
            gates = normal_gates(config.training.seed) if a.init_from is None else torch.ones
            return as_sora(adapter, gates)
        return as_dylora(adapter, frozen=a.dylora_frozen, export_ranks=a.export_ranks or [a.r])
    seed = config.training.seed
    if a.use_dora and zero_stage == 3:
        # DoRA's weight norm reads each module's whole weight, which ZeRO-3 partitions.
        raise ValueError("use_dora: DoRA is not supported on a base partitioned by ZeRO-3")
    if a.peft_type == "ADALORA":
        if a.init_from is not None:  # its saved ranks, fixed: see adalora_format
            loaded = read_adalora_adapter(a.init_from)
            return adalora_adapter_from_loaded(
                base,
                config.name,
                loaded,
                dropout=a.lora_dropout,
                seed=seed,
                orth_reg_weight=a.orth_reg_weight,
            )
        return new_adalora_adapter(
            base,
            config.name,
            lora_alpha=a.lora_alpha,
            dropout=a.lora_dropout,
            target_modules=a.target_modules,
            seed=seed,
            schedule=schedule_of(a),
        )
    if a.peft_type == "VERA":
        if a.init_from is not None:
            loaded = read_vera_adapter(a.init_from)
            return vera_adapter_from_loaded(
                base, config.name, loaded, dropout=a.vera_dropout, seed=seed
            )
        return new_vera_adapter(
            base,
            config.name,
            r=a.r,
            dropout=a.vera_dropout,
            target_modules=a.target_modules,
            seed=seed,
            d_initial=a.d_initial,
            projection_prng_key=a.projection_prng_key,
            save_projection=a.save_projection,
        )
    if a.init_from is not None:
        loaded = read_adapter(a.init_from)
        return adapter_from_loaded(
            base,
            config.name,
            loaded,
            dropout=a.lora_dropout,
            seed=seed,
            freeze_lora_A=a.freeze_lora_A,
        )
    return new_job_adapter(
        base,
        config.name,
        r=a.r,
        lora_alpha=a.lora_alpha,
        use_rslora=a.use_rslora,
        dropout=a.lora_dropout,
        target_modules=a.target_modules,
        seed=seed,
        freeze_lora_A=a.freeze_lora_A,
        rank_pattern=a.rank_pattern,
        alpha_pattern=a.alpha_pattern,
        use_dora=a.use_dora,
    )
