"""Adapters named on the command line: `DIR` or `NAME=DIR`, the same in every command."""

from __future__ import annotations

from pathlib import Path

from carpool.workers.base_fingerprint import trained_on_other_base

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
