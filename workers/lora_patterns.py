"""Per-module rank and alpha (`rank_pattern`, `alpha_pattern`), resolved as PEFT does.

PEFT reads each pattern key as a regular expression that must match the whole
module name or a dotted suffix of it (`mlp.down_proj` matches
`model.layers.0.mlp.down_proj`); the first key in the mapping's order that
matches wins, and a module no key matches keeps the adapter's `r` or
`lora_alpha`. The same semantics here mean an exported adapter loads in PEFT
with the shapes and scaling it was trained with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

V = TypeVar("V")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be a pattern key (PEFT compiles it into a regex), or None."""
    if not key:
        return "a key must not be empty"
    try:
        re.compile(key)  # alone first, so an error's position is within the key
        re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        return f"key {key!r} is not a valid regular expression: {e}"
    return None


def key_matches(key: str, module: str) -> bool:
    """Whether pattern `key` selects `module` (the whole name or a dotted suffix, as a regex)."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def pattern_value(pattern: Mapping[str, V], module: str, default: V) -> V:
    """The value of the first key of `pattern` that matches `module`, else `default`."""
    for key, value in pattern.items():
        if key_matches(key, module):
            return value
    return default


def unmatched_keys(pattern: Iterable[str], modules: Sequence[str]) -> list[str]:
    """Keys of `pattern` that select none of `modules` (PEFT ignores them silently)."""
    return [key for key in pattern if not any(key_matches(key, m) for m in modules)]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's output scale: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)
