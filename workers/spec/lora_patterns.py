"""Per-module rank and alpha (`rank_pattern`, `alpha_pattern`), resolved as PEFT does.

PEFT reads each pattern key as a regular expression that must match the whole
module name or a dotted suffix of it (`mlp.down_proj` matches
`model.layers.0.mlp.down_proj`); the first key in the mapping's order that
matches wins, and a module no key matches keeps the adapter's `r` or
`lora_alpha`. The same semantics here mean an exported adapter loads in PEFT
with the shapes and scaling it was trained with.

PEFT writes `adapter_config.json` with sorted keys, so a loaded config meets
its pattern keys in sorted order, not the order they were trained with: where
that changes which key wins, the export spells the patterns out per module
(`order_free`).
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


def pattern_key(pattern: Iterable[str], module: str) -> str | None:
    """The first key of `pattern` that matches `module`, or None."""
    return next((key for key in pattern if key_matches(key, module)), None)


def pattern_value(pattern: Mapping[str, V], module: str, default: V) -> V:
    """The value of the first key of `pattern` that matches `module`, else `default`."""
    key = pattern_key(pattern, module)
    return default if key is None else pattern[key]


def order_free(pattern: Mapping[str, V], modules: Sequence[str], default: V) -> dict[str, V]:
    """`pattern`, or an equivalent whose result on `modules` does not depend on key order.

    Where sorting the keys changes some module's value, each module whose value
    is not `default` gets a key of its own: its full name, escaped, which
    selects that module alone.
    """
    ordered = dict(sorted(pattern.items()))
    if all(
        pattern_value(pattern, m, default) == pattern_value(ordered, m, default) for m in modules
    ):
        return dict(pattern)
    out = {}
    for m in modules:
        value = pattern_value(pattern, m, default)
        if value != default:
            out[re.escape(m)] = value
    return out


def unmatched_keys(pattern: Iterable[str], modules: Sequence[str]) -> list[str]:
    """Keys of `pattern` that select none of `modules` (PEFT ignores them silently)."""
    return [key for key in pattern if not any(key_matches(key, m) for m in modules)]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's output scale: alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)
