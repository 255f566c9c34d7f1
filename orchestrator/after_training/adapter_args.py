"""Adapters named on the command line: `DIR` or `NAME=DIR`, the same in every command."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from carpool.workers.base.base_fingerprint import read_provenance, trained_on_other_base
from carpool.workers.spec.job_spec import QuantizationSpec
from pydantic import ValidationError

# Torch-free on purpose: a command refused here loads no model and no torch.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterArgumentError(ValueError):
    """A named adapter that cannot be used, named by the argument that gave it."""


def named_adapters(values: list[str]) -> dict[str, Path]:
    """`DIR` or `NAME=DIR` arguments as {name: dir}, each checked to be a PEFT adapter.

    The name defaults to the directory's name; two adapters may not share one.
    """
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path_text = value.partition("=")
        if not sep:
            name, path_text = "", value
        path = Path(path_text)
        name = name or path.resolve().name
        if not name or "=" in path_text:
            raise AdapterArgumentError(f"adapter {value!r}: write DIR or NAME=DIR")
        if name in adapters:
            raise AdapterArgumentError(
                f"adapter {value!r}: the name {name!r} is already used by {adapters[name]}; "
                "name them apart with NAME=DIR"
            )
        if why := _not_an_adapter(path):
            raise AdapterArgumentError(f"adapter {value!r}: {why}")
        adapters[name] = path
    return adapters


def with_exported_ranks(adapters: dict[str, Path]) -> dict[str, Path]:
    """The adapters, each DyLoRA one followed by its other exported ranks as
    `<name>@rank-<b>` (its `rank-<b>/` directories): one fused eval is its loss by rank."""
    out: dict[str, Path] = {}
    for name, path in adapters.items():
        out[name] = path
        record = read_provenance(path) or {}
        if record.get("adapter_kind") != "dylora":
            continue
        for b in record.get("dylora_ranks", []):
            if b != record.get("dylora_rank") and (path / f"rank-{b}").is_dir():
                out[f"{name}@rank-{b}"] = path / f"rank-{b}"
    return out


def _not_an_adapter(path: Path) -> str | None:
    if not path.is_dir():
        return f"not a directory: {path}"
    if not (path / CONFIG_FILE).is_file():
        return f"no {CONFIG_FILE} in {path} (not a PEFT adapter)"
    if not (path / WEIGHTS_FILE).is_file():
        return f"no {WEIGHTS_FILE} in {path} (only safetensors adapters are read)"
    return None


def check_same_base(adapters: dict[str, Path], base_model: str) -> None:
    """Refuse, naming both bases, an adapter whose record says it was trained on another."""
    for path in adapters.values():
        try:
            why = trained_on_other_base(path, base_model)
        except ValueError as e:
            raise AdapterArgumentError(str(e)) from e
        if why is not None:
            raise AdapterArgumentError(why)


QUANTIZATION_CHOICES = ("auto", "none", "nf4", "fp4")


def base_quantization(adapters: dict[str, Path], choice: str) -> QuantizationSpec | None:
    """How to load the base for these adapters: `auto` loads it as they were trained
    (a QLoRA adapter's record names its 4-bit loading), `none` in its own precision,
    `nf4`/`fp4` in 4 bits with QLoRA's other defaults."""
    if choice == "none":
        return None
    if choice != "auto":
        quantization = QuantizationSpec(bnb_4bit_quant_type=choice)
    else:
        quantization = _recorded_quantization(adapters)
    if quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterArgumentError(
            "a 4-bit base needs bitsandbytes, which is not installed: "
            "pip install 'carpool[quantization]' (or --base-quantization none)"
        )
    return quantization


def _recorded_quantization(adapters: dict[str, Path]) -> QuantizationSpec | None:
    """The base's loading the adapters' records name, the same for all of them."""
    recorded = {}
    for name, path in adapters.items():
        try:
            recorded[name] = (read_provenance(path) or {}).get("base_quantization")
        except ValueError as e:
            raise AdapterArgumentError(str(e)) from e
    if len({json.dumps(q, sort_keys=True) for q in recorded.values()}) > 1:
        described = "; ".join(f"{name}: {_described(q)}" for name, q in recorded.items())
        raise AdapterArgumentError(
            f"the adapters were trained on bases loaded differently ({described}); "
            "choose one with --base-quantization none|nf4|fp4"
        )
    name, quantization = next(iter(recorded.items()), (None, None))
    if quantization is None:
        return None
    try:
        return QuantizationSpec.model_validate(quantization)
    except ValidationError as e:
        raise AdapterArgumentError(
            f"adapter {name!r}: its record's base_quantization is not valid ({e})"
        ) from e


def _described(quantization: dict | None) -> str:
    if quantization is None:
        return "full precision"
    return f"4-bit {quantization.get('bnb_4bit_quant_type', 'nf4')}"
