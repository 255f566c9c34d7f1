"""What validation reads of a base model, kept on disk between runs.

Validation checks a job's targets against the base's linear modules, which only
the base's model class can list, and reads the job's rows with the tokenizer
class that AutoTokenizer picks from the base's config. Finding the two costs
about a second per process, mostly transformers importing the family's
configuration and modeling code. Both follow from the base's config and
tokenizer files and transformers' version alone, so they are kept keyed by
those, and the next validation of the same base reads them back: a changed
file, another transformers or another carpool rule is another key, never a
stale answer. Only local directories are kept (a hub id names no files here).

Where: $CARPOOL_CACHE_DIR, else $XDG_CACHE_HOME/carpool, else ~/.cache/carpool;
one small JSON file per base and transformers version, under `base-facts/`.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CACHE_DIR_VAR = "CARPOOL_CACHE_DIR"
# Bump when what is kept, or how it is found (e.g. which modules count as linear), changes.
FACTS_FORMAT = 1
# The files whose contents decide the facts: the config (the model class, so its
# linear modules) and what AutoTokenizer reads to pick a tokenizer class. The
# directory's file names are keyed too (AutoTokenizer also looks for some files).
_KEY_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class BaseFacts:
    """A base's targetable linear modules, (in_features, out_features) by name, and
    the name of the transformers tokenizer class AutoTokenizer loads it with."""

    linear_shapes: dict[str, tuple[int, int]]
    tokenizer_class: str


def cache_dir() -> Path:
    """carpool's cache directory (see the module docstring for the precedence)."""
    if explicit := os.environ.get(CACHE_DIR_VAR):
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache_home).expanduser() / "carpool"


def facts_key(base_dir: Path) -> str | None:
    """The key of a local base's facts; None where it is no directory with a config."""
    if not (base_dir / "config.json").is_file():
        return None
    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        return None
    digest = hashlib.sha256(f"{FACTS_FORMAT}\0{transformers_version}\0".encode())
    digest.update("\0".join(sorted(p.name for p in base_dir.iterdir())).encode())
    for name in _KEY_FILES:
        path = base_dir / name
        digest.update(f"\0{name}\0".encode())
        digest.update(path.read_bytes() if path.is_file() else b"(none)")
    return digest.hexdigest()


def _facts_file(name_or_path: str) -> Path | None:
    base_dir = Path(name_or_path).expanduser()
    if not base_dir.is_dir():
        return None
    try:
        key = facts_key(base_dir)
    except OSError:  # unreadable files: found the slow way, and reported there
        return None
    return None if key is None else cache_dir() / "base-facts" / f"{key}.json"


def read_base_facts(name_or_path: str) -> BaseFacts | None:
    """The facts kept for this base, or None (not kept, not local, or unreadable)."""
    path = _facts_file(name_or_path)
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        shapes = {name: (int(i), int(o)) for name, (i, o) in raw["linear_shapes"].items()}
        return BaseFacts(shapes, str(raw["tokenizer_class"]))
    except (OSError, ValueError, KeyError, TypeError):  # absent, or damaged: found again
        return None


def remember_base_facts(name_or_path: str, facts: BaseFacts) -> None:
    """Keep `facts` for this base; quietly nothing where the cache cannot be written
    (a read-only home costs the next run its second, not its validation)."""
    path = _facts_file(name_or_path)
    if path is None:
        return
    record = {"linear_shapes": facts.linear_shapes, "tokenizer_class": facts.tokenizer_class}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(record), encoding="utf-8")
        os.replace(partial, path)  # whole or absent: a reader never sees half a file
    except OSError:
        return
