"""A cheap identity for a base model, and the provenance file an exported adapter carries.

An adapter is only meaningful on the base it was trained on. PEFT records the
base's name (`base_model_name_or_path`), which says nothing when two bases
share a path or one base is known by two names. The fingerprint is a hash of
what a base *is* without reading its weights: its config (minus fields that
name or date the file rather than the model) and, from the weight files'
headers, every tensor's name, shape, dtype and byte size. For an 8B base that
is a few megabytes of headers, read in milliseconds.

Each exported adapter gets `carpool_adapter.json` beside PEFT's files:
`{"base_model": ..., "base_fingerprint": ..., "adapter_kind": ...}`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

PROVENANCE_FILE = "carpool_adapter.json"
# Config keys that change with who saved the model or how, not with the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def local_model_dir(name_or_path: str) -> Path | None:
    """The local directory holding a base's files: the path itself, or a hub
    id's snapshot already in the local cache (never downloaded here)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a hub id, or not cached: no fingerprint
        return None


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets), no tensor data."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _tensor_entries(model_dir: Path) -> list[tuple]:
    entries = []
    for weights in sorted(model_dir.glob("*.safetensors")):
        for name, info in _safetensors_header(weights).items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            entries.append((name, tuple(info["shape"]), info["dtype"], end - start))
    if not entries:  # pickled checkpoints: their headers cannot be read without loading them
        entries = [(p.name, p.stat().st_size) for p in sorted(model_dir.glob("*.bin"))]
    return sorted(entries)


@lru_cache(maxsize=8)
def base_fingerprint(name_or_path: str) -> str | None:
    """`sha256:<hex>` of a base's config and tensor headers; None when its files are not local."""
    model_dir = local_model_dir(name_or_path)
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    config = json.loads((model_dir / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    identity = {"config": config, "tensors": _tensor_entries(model_dir)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}"


def write_provenance(
    adapter_dir: str | Path,
    *,
    base_model: str,
    adapter_kind: str,
    details: Mapping[str, object] | None = None,
) -> None:
    """Record beside an exported adapter which base it was trained on (and, in `details`,
    anything else about how it was made, e.g. what a merged adapter was merged from)."""
    record = {
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(base_model),
        "adapter_kind": adapter_kind,
        **(details or {}),
    }
    (Path(adapter_dir) / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_provenance(adapter_dir: str | Path) -> dict | None:
    """An adapter's provenance record, or None for an adapter made elsewhere."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def trained_on_other_base(adapter_dir: str | Path, base_model: str) -> str | None:
    """One line naming both bases when an adapter's record says it was trained on
    another base; None when it matches, or when there is no record or no fingerprint
    to compare (then the adapter's shapes decide whether it fits)."""
    record = read_provenance(adapter_dir)
    if record is None:
        return None
    theirs, ours = record.get("base_fingerprint"), base_fingerprint(base_model)
    if theirs is None or ours is None or theirs == ours:
        return None
    return (
        f"{adapter_dir}: trained on base {record.get('base_model')!r} "
        f"({str(theirs)[:19]}), not on {base_model!r} ({ours[:19]})"
    )
