"""Loading finished adapters (carpool's or anyone's, in PEFT's format) onto a base.

Eval, generation and merging take adapter directories, not job specs: the kind
comes from the adapter's own `peft_type`, and the loaded adapter has no dropout
(it is used, not trained).
"""

from __future__ import annotations

import json
from pathlib import Path

from carpool.workers.peft_files.adalora_format import (
    adalora_adapter_from_loaded,
    read_adalora_adapter,
)
from carpool.workers.peft_files.peft_format import (
    AdapterFormatError,
    adapter_files,
    adapter_from_loaded,
    read_adapter,
)
from carpool.workers.peft_files.vera_format import read_vera_adapter, vera_adapter_from_loaded
from carpool.workers.variants.job_adapter import JobAdapter
from torch import nn

KINDS = ("LORA", "VERA", "ADALORA")


def peft_type_of(path: str | Path) -> str:
    """The `peft_type` an adapter directory's config declares (LORA when absent)."""
    config_path, _ = adapter_files(path)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{config_path}: cannot read: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind not in KINDS:
        raise AdapterFormatError(
            f"{config_path}: peft_type {kind!r} is not one carpool loads ({', '.join(KINDS)})"
        )
    return kind


def load_finished_adapter(base: nn.Module, name: str, path: str | Path) -> JobAdapter:
    """The adapter at `path` as `name` on `base`, any kind carpool trains; checked to fit."""
    kind = peft_type_of(path)
    if kind == "VERA":
        return vera_adapter_from_loaded(base, name, read_vera_adapter(path), dropout=0.0, seed=0)
    if kind == "ADALORA":
        loaded = read_adalora_adapter(path)
        return adalora_adapter_from_loaded(base, name, loaded, dropout=0.0, seed=0)
    return adapter_from_loaded(base, name, read_adapter(path), dropout=0.0, seed=0)
