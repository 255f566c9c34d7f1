"""Reading and writing adapters in PEFT's on-disk format.

A directory with `adapter_config.json` (written through `peft.LoraConfig`)
and `adapter_model.safetensors` whose keys are PEFT's
`base_model.model.<module>.lora_{A,B}.weight`, so
`PeftModel.from_pretrained(base, dir)` loads it with no conversion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workers.adapter_bank import JobAdapter, LoraWeights
from workers.base_model import linear_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """An adapter directory that is not a PEFT LoRA adapter carpool can start from."""


def peft_state_dict(adapter: JobAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, w in adapter.modules.items():
        out[f"{_PREFIX}{module}.lora_A.weight"] = w.lora_A.detach().contiguous()
        out[f"{_PREFIX}{module}.lora_B.weight"] = w.lora_B.detach().contiguous()
    return out


def export_adapter(
    adapter: JobAdapter,
    out_dir: str | Path,
    *,
    base_model: str,
) -> Path:
    """Write `adapter` as a PEFT LoRA adapter directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = (
        sorted({m.rsplit(".", 1)[-1] for m in adapter.modules})
        if adapter.target_modules == "all-linear"
        else list(adapter.target_modules)
    )
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        use_rslora=adapter.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out))
    tensors = {k: v.cpu() for k, v in peft_state_dict(adapter).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


@dataclass(frozen=True)
class LoadedAdapter:
    """A PEFT LoRA adapter read from disk: what it declares and its weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)


def read_adapter(path: str | Path) -> LoadedAdapter:
    """Read a PEFT LoRA adapter directory (safetensors only: no pickles)."""
    root = Path(path)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{root}: no {CONFIG_FILE}")
    if not weights_path.is_file():
        raise AdapterFormatError(f"{root}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{config_path}: invalid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{config_path}: peft_type is {cfg.get('peft_type')!r}, not LORA")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise AdapterFormatError(f"{config_path}: {unsupported} is not supported")
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise AdapterFormatError(f"{config_path}: DoRA and LoRA biases are not supported")
    missing = [key for key in ("r", "lora_alpha") if key not in cfg]
    if missing:
        raise AdapterFormatError(f"{config_path}: no {' or '.join(missing)}")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as e:
        raise AdapterFormatError(f"{weights_path}: not a safetensors file: {e}") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{weights_path}: {module} lacks lora_A or lora_B")
        weights[module] = (ab["A"], ab["B"])
    targets = cfg.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in weights})
    return LoadedAdapter(
        r=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        weights=weights,
    )


def adapter_from_loaded(
    base: nn.Module,
    name: str,
    loaded: LoadedAdapter,
    *,
    dropout: float,
    seed: int,
    freeze_lora_A: bool = False,
) -> JobAdapter:
    """A JobAdapter on `base` starting from a loaded PEFT adapter's weights."""
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    adapter = JobAdapter(
        name=name,
        r=loaded.r,
        lora_alpha=loaded.lora_alpha,
        use_rslora=loaded.use_rslora,
        target_modules=loaded.target_modules,
        dropout=dropout,
        seed=seed,
    )
    for module in sorted(loaded.weights, key=lambda m: index.get(m, -1)):
        a, b = loaded.weights[module]
        linear = linears.get(module)
        if linear is None:
            raise AdapterFormatError(f"adapter targets {module!r}, which the base does not have")
        if tuple(a.shape) != (loaded.r, linear.in_features) or tuple(b.shape) != (
            linear.out_features,
            loaded.r,
        ):
            raise AdapterFormatError(
                f"adapter weights for {module} have shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                f"expected ({loaded.r}, {linear.in_features}), ({linear.out_features}, {loaded.r})"
            )
        adapter.modules[module] = LoraWeights.beside(linear, a, b, index[module], freeze_lora_A)
    return adapter
