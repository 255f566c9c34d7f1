"""Paths in a job file are the user's: relative ones are taken against the file's folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def resolve_spec_paths(raw: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of a raw spec with its relative paths taken relative to `base_dir`.

    `base_dir` is the YAML file's folder, so a job file can name its data next
    to itself. `base_model` may also be a hub id or a path relative to the
    working directory: it changes only when the YAML-relative path exists.
    Values of the wrong type are left for the schema to report.
    """
    out = dict(raw)
    base = out.get("base_model")
    if isinstance(base, str) and base and not Path(base).expanduser().is_absolute():
        candidate = base_dir / base
        if candidate.exists():
            out["base_model"] = str(candidate)
    for section, key in (("dataset", "path"), ("eval_dataset", "path"), ("adapter", "init_from")):
        sub = out.get(section)
        if isinstance(sub, Mapping) and isinstance(sub.get(key), str) and sub[key]:
            path = Path(sub[key]).expanduser()
            out[section] = {**sub, key: str(path if path.is_absolute() else base_dir / path)}
    return out
