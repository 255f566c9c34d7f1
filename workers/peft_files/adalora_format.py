"""Reading a PEFT AdaLoRA adapter directory, to start an ADALORA job from it or to use it.

Its config carries AdaLoraConfig's schedule (init_r, target_r, tinit, tfinal,
deltaT, beta1, beta2, orth_reg_weight, total_step), lora_alpha, lora_dropout,
target_modules and, once ranks were pruned, `rank_pattern` ("<module>.lora_E"
-> init_r booleans); its safetensors each module's `lora_A` [k, in], `lora_E`
[k, 1] and `lora_B` [out, k], cut to the k kept ranks.

What PEFT does with it (`PeftModel.from_pretrained(base, dir, is_trainable=True)`,
peft 0.21): it builds every module at init_r, creates its `RankAllocator` (budget
init_r per module), then `resize_modules_by_rank_pattern` replaces each module's
triplets by k-rank ones holding the saved weights; `ranknum` (the divisor) keeps
init_r. Training the loaded triplets with the orthogonality penalty works, but its
continued `update_and_allocate` does not: after tinit it prunes the kept ranks
again against the init_r budget (at total_step - tfinal it prunes init_r - target_r
of the at most target_r kept per module: everything, or kthvalue fails), and past
that step without passing it, its init_r-long `rank_pattern` no longer fits E and
masking raises. So carpool matches what PEFT can run: the loaded rank pattern
fixed, the kept triplets trained with the penalty, no scoring or pruning
(`RankAllocator.fixed`); the export writes the same pattern and kept ranks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from carpool.workers.base.base_model import (
    features,
    is_fan_in_fan_out,
    linear_modules,
    weight_dtype,
)
from carpool.workers.peft_files.peft_format import (
    WEIGHTS_FILE,
    AdapterFormatError,
    Shape,
    adapter_files,
    config_number,
    dims,
    first_misfit,
    load_config,
    tensor_shapes,
)
from carpool.workers.variants.adalora import AdaLoraSchedule, AdaLoraWeights, RankAllocator
from carpool.workers.variants.job_adapter import JobAdapter, adapter_dtype
from safetensors.torch import load_file
from torch import nn

_KINDS = ("lora_A", "lora_E", "lora_B")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_[AEB]|ranknum)$")
# (config key, default as AdaLoraConfig has it, whole number?)
_SCHEDULE = (
    ("init_r", 12, True),
    ("target_r", 8, True),
    ("tinit", 0, True),
    ("tfinal", 0, True),
    ("deltaT", 1, True),
    ("beta1", 0.85, False),
    ("beta2", 0.85, False),
    ("orth_reg_weight", 0.5, False),
)


@dataclass(frozen=True)
class AdaLoraHeader:
    """What a PEFT AdaLoRA adapter declares, and its tensors' shapes, read without its weights."""

    schedule: AdaLoraSchedule
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, list[bool]] | None  # "<module>.lora_E" -> init_r booleans
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # module -> (A's, E's, B's shape)


@dataclass(frozen=True)
class LoadedAdaLora:
    header: AdaLoraHeader
    triplets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> (A, E, B)


def _by_module(items: list[tuple[str, object]], weights_path: Path) -> dict[str, tuple]:
    """module -> (A, E, B) from PEFT's keys (a `ranknum` an older PEFT saved is ignored:
    it is always init_r)."""
    found: dict[str, dict[str, object]] = {}
    for key, value in items:
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}")
        if match["kind"] != "ranknum":
            found.setdefault(match["module"], {})[match["kind"]] = value
    if not found:
        raise AdapterFormatError(f"{weights_path}: holds no AdaLoRA triplets")
    for module, parts in found.items():
        if set(parts) != set(_KINDS):
            raise AdapterFormatError(
                f"{weights_path}: {module} lacks one of lora_A, lora_E, lora_B"
            )
    return {m: tuple(p[k] for k in _KINDS) for m, p in found.items()}


def _rank_pattern(cfg: dict, init_r: int, config_path: Path) -> dict[str, list[bool]] | None:
    """The config's rank_pattern with PEFT's adapter name taken out of its keys, checked."""
    raw = cfg.get("rank_pattern")
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{config_path}: rank_pattern must be a mapping, got {raw!r}")
    pattern = {}
    for key, keep in raw.items():
        if not (isinstance(keep, list) and all(isinstance(b, bool) for b in keep)):
            raise AdapterFormatError(f"{config_path}: rank_pattern[{key!r}] must be booleans")
        if len(keep) != init_r:
            raise AdapterFormatError(
                f"{config_path}: rank_pattern[{key!r}] has {len(keep)} entries, not init_r={init_r}"
            )
        pattern[key.removesuffix(".default")] = keep
    return pattern


def read_adalora_header(path: str | Path) -> AdaLoraHeader:
    """Check a PEFT AdaLoRA adapter directory and read its config and tensor shapes."""
    config_path, weights_path = adapter_files(path)
    cfg = load_config(config_path, "ADALORA")
    values = {}
    for key, default, whole in _SCHEDULE:
        value = config_number(cfg, key, default, whole, config_path)
        values[key] = value if whole else float(value)
    if values["init_r"] < 1:
        raise AdapterFormatError(f"{config_path}: init_r must be >= 1, got {values['init_r']}")
    total_step = cfg.get("total_step")
    if not isinstance(total_step, int) or isinstance(total_step, bool) or total_step < 1:
        raise AdapterFormatError(f"{config_path}: total_step must be a whole number >= 1")
    alpha = config_number(cfg, "lora_alpha", 8, False, config_path)
    dropout = config_number(cfg, "lora_dropout", 0.0, False, config_path)
    if not 0 <= dropout < 1:
        raise AdapterFormatError(f"{config_path}: lora_dropout must be in [0, 1), got {dropout}")
    shapes = _by_module(tensor_shapes(weights_path), weights_path)
    targets = cfg.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in shapes})
    return AdaLoraHeader(
        schedule=AdaLoraSchedule(**values, total_step=total_step),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        rank_pattern=_rank_pattern(cfg, values["init_r"], config_path),
        shapes=shapes,
    )


def read_adalora_adapter(path: str | Path) -> LoadedAdaLora:
    """Read a PEFT AdaLoRA adapter directory (safetensors only: no pickles)."""
    header = read_adalora_header(path)
    weights_path = Path(path) / WEIGHTS_FILE
    return LoadedAdaLora(
        header, _by_module(list(load_file(str(weights_path)).items()), weights_path)
    )


def kept_ranks(header: AdaLoraHeader, module: str) -> int:
    """The ranks a module's saved triplets should have: its pattern's kept ones, else init_r."""
    pattern = header.rank_pattern
    if pattern is None:
        return header.schedule.init_r
    return sum(pattern.get(f"{module}.lora_E", [True] * header.schedule.init_r))


def adalora_misfit(header: AdaLoraHeader, base_shapes: Mapping[str, tuple[int, int]]) -> str | None:
    """Why an AdaLoRA adapter's tensors do not fit a base's linear modules (or its own rank
    pattern), or None when they do. One line: the first misfit in model order, and a count."""
    order = {name: i for i, name in enumerate(base_shapes)}
    misfits = []
    for module in sorted(header.shapes, key=lambda m: (order.get(m, len(order)), m)):
        a, e, b = header.shapes[module]
        k = kept_ranks(header, module)
        if module not in base_shapes:
            misfits.append(f"{module}: the base has no such linear module")
            continue
        in_f, out_f = base_shapes[module]
        expected = ((k, in_f), (k, 1), (out_f, k))
        if (a, e, b) != expected:
            got = ", ".join(f"{n} {dims(s)}" for n, s in zip(_KINDS, (a, e, b), strict=True))
            want = ", ".join(f"{dims(s)}" for s in expected)
            misfits.append(f"{module}: {got}; its rank pattern and the base give {want}")
    return first_misfit(misfits)


def adalora_adapter_from_loaded(
    base: nn.Module,
    name: str,
    loaded: LoadedAdaLora,
    *,
    dropout: float,
    seed: int,
    orth_reg_weight: float | None = None,
) -> JobAdapter:
    """An AdaLoRA JobAdapter on `base` holding a loaded PEFT AdaLoRA adapter's kept triplets,
    its rank pattern fixed (module docstring). `orth_reg_weight` (None: the adapter's) is the
    penalty's weight while training it."""
    h = loaded.header
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    base_shapes = {n: features(m) for n, m in linears.items()}
    if why := adalora_misfit(h, base_shapes):
        raise AdapterFormatError(f"adapter does not fit the base: {why}")
    schedule = h.schedule
    if orth_reg_weight is not None:
        schedule = replace(schedule, orth_reg_weight=orth_reg_weight)
    pattern = h.rank_pattern
    adapter = JobAdapter(
        name=name,
        r=schedule.init_r,
        lora_alpha=h.lora_alpha,
        use_rslora=False,
        target_modules=h.target_modules,
        dropout=dropout,
        seed=seed,
        peft_type="ADALORA",
        adalora=RankAllocator(
            schedule, rank_pattern=dict(pattern) if pattern else None, fixed=True
        ),
    )
    for module in sorted(loaded.triplets, key=index.__getitem__):
        linear = linears[module]
        dtype = adapter_dtype(weight_dtype(linear))
        a, e, b = (
            nn.Parameter(t.to(device=linear.weight.device, dtype=dtype).clone())
            for t in loaded.triplets[module]
        )
        # ranknum stays init_r, as PEFT's resize keeps the divisor of the unpruned module.
        adapter.modules[module] = AdaLoraWeights(
            a, e, b, h.lora_alpha, float(schedule.init_r), index[module], is_fan_in_fan_out(linear)
        )
    return adapter
