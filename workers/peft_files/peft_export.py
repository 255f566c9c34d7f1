"""Writing a job's adapter as a PEFT adapter directory (`peft_format` reads them).

The config goes through PEFT's own `LoraConfig`, `VeraConfig` or `AdaLoraConfig`;
the tensors under PEFT's key names; beside them `carpool_adapter.json`, the base
the adapter was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from carpool.workers.base.base_fingerprint import write_provenance
from carpool.workers.base.unseen_packages import peft_without_bitsandbytes
from carpool.workers.peft_files.peft_format import PREFIX, WEIGHTS_FILE
from carpool.workers.spec.job_spec import QuantizationSpec
from carpool.workers.spec.lora_patterns import order_free
from carpool.workers.variants.adalora import AdaLoraWeights
from carpool.workers.variants.dylora import at_rank
from carpool.workers.variants.job_adapter import MAGNITUDE, JobAdapter
from carpool.workers.variants.sora import kept_adapter
from carpool.workers.variants.vera import LAMBDA_B, LAMBDA_D, VeraWeights
from safetensors.torch import save_file


def peft_state_dict(adapter: JobAdapter) -> dict[str, torch.Tensor]:
    out = {}
    if adapter.vera is not None and adapter.vera.save_projection:
        out["base_model.vera_A"] = adapter.vera.shared.vera_A.contiguous()
        out["base_model.vera_B"] = adapter.vera.shared.vera_B.contiguous()
    for module, w in adapter.modules.items():
        if isinstance(w, VeraWeights):
            out[f"{PREFIX}{module}.{LAMBDA_D}"] = w.lambda_d.detach().contiguous()
            out[f"{PREFIX}{module}.{LAMBDA_B}"] = w.lambda_b.detach().contiguous()
            continue
        if isinstance(w, AdaLoraWeights):
            out.update(_adalora_tensors(adapter, module, w))
            continue
        out[f"{PREFIX}{module}.lora_A.weight"] = w.lora_A.detach().contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = w.lora_B.detach().contiguous()
        if w.magnitude is not None:
            out[f"{PREFIX}{module}.{MAGNITUDE}"] = w.magnitude.detach().contiguous()
    return out


def _adalora_tensors(adapter: JobAdapter, module: str, w: AdaLoraWeights) -> dict:
    """A module's triplets without the ranks the allocator pruned (PEFT's
    `resize_state_dict_by_rank_pattern`, which leaves a module already cut to its kept ranks,
    as one started from a saved adapter is, as it is)."""
    pattern = adapter.adalora.rank_pattern if adapter.adalora else None
    keep = slice(None)
    if pattern is not None and sum(pattern[f"{module}.lora_E"]) != w.lora_E.shape[0]:
        keep = torch.tensor(pattern[f"{module}.lora_E"], device=w.lora_E.device)
    return {
        f"{PREFIX}{module}.lora_A": w.lora_A.detach()[keep].contiguous(),
        f"{PREFIX}{module}.lora_E": w.lora_E.detach()[keep].contiguous(),
        f"{PREFIX}{module}.lora_B": w.lora_B.detach()[:, keep].contiguous(),
    }


class AdapterExportError(ValueError):
    """A trained adapter that cannot be written (a SoRA adapter with no component left): the
    job fails with this reason; its checkpoints stay."""


def export_adapter(
    adapter: JobAdapter,
    out_dir: str | Path,
    *,
    base_model: str,
    base_quantization: QuantizationSpec | None = None,
) -> Path:
    """Write `adapter` as a PEFT adapter directory, with carpool's record of its base
    (and of the base's 4-bit loading, for a QLoRA adapter: eval and generate load it so).

    A DyLoRA adapter is written as plain LoRA at each of its export ranks: rank r in
    `out_dir`, each other rank b in `out_dir/rank-<b>`; a SoRA adapter as plain LoRA of its
    kept components (a ValueError when none is left); `carpool_adapter.json` names the kind
    it was trained as and the ranks it holds."""
    if adapter.peft_type == "DYLORA":
        return _export_dylora(adapter, Path(out_dir), base_model, base_quantization)
    if adapter.peft_type == "SORA":  # its kept components, as plain LoRA
        kept, ranks = kept_adapter(adapter)
        if not kept.modules:
            raise AdapterExportError(
                "every SoRA gate is zero: no component is left to export (sparse_lambda_2 "
                "thresholds gates harder than training moves them; lower it)"
            )
        details = {"sora_kept_ranks": ranks}
        return _export(kept, Path(out_dir), base_model, base_quantization, "sora", details)
    return _export(adapter, Path(out_dir), base_model, base_quantization)


def _export_dylora(
    adapter: JobAdapter,
    out: Path,
    base_model: str,
    base_quantization: QuantizationSpec | None,
) -> Path:
    ranks = sorted({adapter.r, *adapter.export_ranks}, reverse=True)
    for b in ranks:
        where = out if b == adapter.r else out / f"rank-{b}"
        details = {"dylora_rank": b, "dylora_ranks": ranks}
        _export(at_rank(adapter, b), where, base_model, base_quantization, "dylora", details)
    return out


def _export(
    adapter: JobAdapter,
    out: Path,
    base_model: str,
    base_quantization: QuantizationSpec | None,
    kind: str | None = None,
    extra: dict | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    targets = (
        sorted({m.rsplit(".", 1)[-1] for m in adapter.modules})
        if adapter.target_modules == "all-linear"
        else list(adapter.target_modules)
    )
    with peft_without_bitsandbytes():  # late: only a finished job needs it
        from peft import LoraConfig

    config = (
        _vera_config(adapter, targets, base_model)
        if adapter.vera
        else _adalora_config(adapter, targets, base_model)
        if adapter.adalora
        else LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.dropout,
            target_modules=targets,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
            # Conv1D targets (GPT-2): PEFT loads them with this set, and would warn without it.
            fan_in_fan_out=adapter.fan_in_fan_out,
            rank_pattern=order_free(adapter.rank_pattern, list(adapter.modules), adapter.r),
            alpha_pattern=order_free(
                adapter.alpha_pattern, list(adapter.modules), adapter.lora_alpha
            ),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        )
    )
    config.save_pretrained(str(out))
    tensors = {k: v.cpu() for k, v in peft_state_dict(adapter).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    details = dict(extra or {})
    if base_quantization is not None:
        details["base_quantization"] = base_quantization.model_dump(mode="json")
    write_provenance(
        out,
        base_model=base_model,
        adapter_kind=kind or adapter_kind(adapter),
        details=details or None,
    )
    return out


def adapter_kind(adapter: JobAdapter) -> str:
    """`lora`, `lora+dora`, `vera`, `adalora`, `dylora` or `sora`, as `carpool status`
    names them."""
    if adapter.peft_type in ("DYLORA", "SORA"):
        return adapter.peft_type.lower()
    if adapter.vera is not None:
        return "vera"
    if adapter.adalora is not None:
        return "adalora"
    return "lora+dora" if adapter.use_dora else "lora"


def _adalora_config(adapter: JobAdapter, targets: list[str], base_model: str):
    with peft_without_bitsandbytes():
        from peft import AdaLoraConfig

    assert adapter.adalora is not None
    s = adapter.adalora.schedule
    return AdaLoraConfig(
        init_r=s.init_r,
        target_r=s.target_r,
        tinit=s.tinit,
        tfinal=s.tfinal,
        deltaT=s.deltaT,
        beta1=s.beta1,
        beta2=s.beta2,
        orth_reg_weight=s.orth_reg_weight,
        total_step=s.total_step,
        rank_pattern=adapter.adalora.rank_pattern,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        fan_in_fan_out=adapter.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def _vera_config(adapter: JobAdapter, targets: list[str], base_model: str):
    with peft_without_bitsandbytes():
        from peft import VeraConfig

    assert adapter.vera is not None
    return VeraConfig(
        r=adapter.r,
        target_modules=targets,
        vera_dropout=adapter.dropout,
        d_initial=adapter.vera.d_initial,
        projection_prng_key=adapter.vera.projection_prng_key,
        save_projection=adapter.vera.save_projection,
        fan_in_fan_out=adapter.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
