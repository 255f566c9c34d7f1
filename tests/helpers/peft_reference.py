"""The reference every user trusts: a plain single-job PEFT + AdamW loop.

Per optimizer step it takes the job's next `batch_size` rows in file order,
right-pads them, and lets the HF model compute its causal-LM loss (mean over
the trainable tokens); then optional clipping, AdamW, and the schedule from
transformers' own `get_scheduler`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from carpool.workers.base.quantization import is_4bit
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedRow
from carpool.workers.spec.job_spec import JobSpec
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

_HF_SCHEDULER = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def pad_rows(rows: list[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    seq = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), seq), pad_id)
    labels = torch.full((len(rows), seq), IGNORE_INDEX)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def four_bit_in_train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its bitsandbytes 4-bit modules in train mode, as PEFT's Trainer runs
    them (`model.train()`); every other module as it was. Returns `model`.

    On a CPU with AVX512-BF16, bitsandbytes repacks an eval-mode 4-bit module's weight for
    its bf16 inference kernel the first time an input needs no grad, and computes on that
    kernel from then on. This loop keeps the rest of the base in eval mode (no base dropout,
    as in carpool), so without this its 4-bit modules would train on another kernel than
    a Trainer's: measured on such a CPU, 0.125 and 0.070 relative apart after 4 steps,
    and 0.0 with this. A module's train mode changes nothing else of its forward."""
    for module in model.modules():
        if is_4bit(module):
            module.train()
    return model


def peft_model_with(base_path: Path, config: JobSpec, init: dict[str, torch.Tensor]):
    """A PeftModel whose adapter starts from `init` ({"<module>.lora_A": ...}, and
    "<module>.lora_magnitude_vector" for DoRA).

    A job with `base_quantization` gets its base in 4 bits, as a QLoRA user loads it
    (no `prepare_model_for_kbit_training`: it would upcast and change the base)."""
    if config.base_quantization is None:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    else:
        compute = config.base_quantization.bnb_4bit_compute_dtype
        base = AutoModelForCausalLM.from_pretrained(
            base_path,
            # A bf16-compute QLoRA user loads the rest of the base in bf16 too.
            dtype=torch.bfloat16 if compute == "bfloat16" else torch.float32,
            device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=config.base_quantization.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=config.base_quantization.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=getattr(
                    torch, config.base_quantization.bnb_4bit_compute_dtype
                ),
            ),
        )
        four_bit_in_train_mode(base)
    a = config.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    if a.peft_type == "VERA":
        return _vera_model_with(base, a, targets, init)
    if a.peft_type == "ADALORA":
        return _adalora_model_with(base, a, targets, init)
    lora = LoraConfig(
        r=a.r,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        target_modules=targets,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        rank_pattern=dict(a.rank_pattern),
        alpha_pattern=dict(a.alpha_pattern),
    )
    model = get_peft_model(base, lora)
    modules = {k.rsplit(".", 1)[0] for k in init}
    magnitude = "lora_magnitude_vector"
    with torch.no_grad():
        for name in modules:
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(init[f"{name}.lora_A"])
            layer.lora_B["default"].weight.copy_(init[f"{name}.lora_B"])
            if f"{name}.{magnitude}" in init:
                layer.lora_magnitude_vector["default"].weight.copy_(init[f"{name}.{magnitude}"])
    peft_modules = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert peft_modules == modules, "PEFT and carpool target different modules"
    return model


def _vera_model_with(base, a, targets, init: dict[str, torch.Tensor]):
    vera = VeraConfig(
        r=a.r,
        target_modules=targets,
        vera_dropout=a.vera_dropout,
        d_initial=a.d_initial,
        projection_prng_key=a.projection_prng_key,
        save_projection=a.save_projection,
    )
    model = get_peft_model(base, vera)
    modules = {k.rsplit(".", 1)[0] for k in init}
    with torch.no_grad():
        for name in modules:
            layer = model.base_model.model.get_submodule(name)
            layer.vera_lambda_d["default"].copy_(init[f"{name}.vera_lambda_d"])
            layer.vera_lambda_b["default"].copy_(init[f"{name}.vera_lambda_b"])
    peft_modules = {
        n for n, m in model.base_model.model.named_modules() if hasattr(m, "vera_lambda_d")
    }
    assert peft_modules == modules, "PEFT and carpool target different modules"
    return model


def _adalora_model_with(base, a, targets, init: dict[str, torch.Tensor]):
    config = AdaLoraConfig(
        init_r=a.init_r,
        target_r=a.target_r,
        tinit=a.tinit,
        tfinal=a.tfinal,
        deltaT=a.deltaT,
        beta1=a.beta1,
        beta2=a.beta2,
        orth_reg_weight=a.orth_reg_weight,
        total_step=a.total_step,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        target_modules=targets,
        # As PEFT documents it: a task type gives PeftModelForCausalLM, whose forward goes
        # through AdaLoraModel.forward and so adds the orthogonality penalty to the loss.
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    modules = {k.rsplit(".", 1)[0] for k in init}
    with torch.no_grad():
        for name in modules:
            layer = model.base_model.model.get_submodule(name)
            for kind in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, kind)["default"].copy_(init[f"{name}.{kind}"])
    peft_modules = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")}
    assert peft_modules == modules, "PEFT and carpool target different modules"
    return model


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.base_model.model.named_modules():
        if hasattr(m, "vera_lambda_d"):
            out[f"{name}.vera_lambda_d"] = m.vera_lambda_d["default"].detach().clone()
            out[f"{name}.vera_lambda_b"] = m.vera_lambda_b["default"].detach().clone()
        if hasattr(m, "lora_E"):  # AdaLoRA: parameters, not linears
            for kind in ("lora_A", "lora_E", "lora_B"):
                out[f"{name}.{kind}"] = getattr(m, kind)["default"].detach().clone()
        elif hasattr(m, "lora_A"):
            out[f"{name}.lora_A"] = m.lora_A["default"].weight.detach().clone()
            out[f"{name}.lora_B"] = m.lora_B["default"].weight.detach().clone()
            if "default" in m.lora_magnitude_vector:
                magnitude = m.lora_magnitude_vector["default"].weight
                out[f"{name}.lora_magnitude_vector"] = magnitude.detach().clone()
    return out


def train_reference(
    base_path: Path,
    config: JobSpec,
    rows: list[TokenizedRow],
    init: dict[str, torch.Tensor],
    steps: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Train one job alone, the plain way; returns its adapter tensors."""
    model = peft_model_with(base_path, config, init)
    adalora = config.adapter.peft_type == "ADALORA"
    return _train(model, config, rows, steps, pad_id, allocate=adalora)


def train_loaded_reference(
    base_path: Path,
    config: JobSpec,
    rows: list[TokenizedRow],
    adapter_dir: Path,
    steps: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """PEFT continuing a saved adapter: `PeftModel.from_pretrained(base, dir,
    is_trainable=True)`, then the plain loop. A loaded AdaLoRA adapter is trained without
    `update_and_allocate`, which PEFT cannot run on it (`carpool.workers.peft_files.adalora_format`);
    its orthogonality penalty is in the loss all the same."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    return _train(model, config, rows, steps, pad_id, allocate=False)


def _train(
    model, config: JobSpec, rows: list[TokenizedRow], steps: int, pad_id: int, *, allocate: bool
) -> dict[str, torch.Tensor]:
    t = config.training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    sched = get_scheduler(
        _HF_SCHEDULER[t.lr_scheduler_type],
        opt,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=steps,
    )
    cursor = 0
    for step in range(steps):
        batch = [rows[(cursor + i) % len(rows)] for i in range(t.batch_size)]
        cursor += t.batch_size
        loss = model(**pad_rows(batch, pad_id)).loss
        loss.backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        if allocate:  # as PEFT documents it: after the step, before zero_grad
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return adapter_tensors(model)


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|a| (the issue's tolerance measure)."""
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        if a[k].numel() == 0:  # an AdaLoRA module pruned to no ranks
            continue
        scale = a[k].abs().max().clamp_min(1e-12)
        worst = max(worst, float((a[k] - b[k]).abs().max() / scale))
    return worst


def norm_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||a||: how much of each tensor differs, for runs whose
    elements may differ by rounding noise that Adam turns into whole steps."""
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(
        float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a if a[k].numel()
    )


def save_peft_adapter(base_path: Path, out_dir: Path, **lora: object) -> Path:
    """A PEFT LoRA adapter for the base at `base_path`, saved the way PEFT saves it.

    `lora` are LoraConfig's arguments (r, lora_alpha, target_modules, use_dora, ...).
    """
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    get_peft_model(base, LoraConfig(**lora)).save_pretrained(str(out_dir))
    return out_dir
