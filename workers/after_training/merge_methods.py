"""PEFT's ways of merging LoRA adapters, and the arguments each one takes.

Torch-free on purpose: `carpool merge` refuses a bad argument before torch loads.
"""

from __future__ import annotations

from collections.abc import Sequence

# The `combination_type`s of PEFT's `LoraModel.add_weighted_adapter`.
METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# These combine the adapters' A and B matrices entry by entry: one rank for all.
SAME_RANK = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
# These prune: they keep a `density` fraction of each task's weights.
USES_DENSITY = frozenset(m for m in METHODS if m.startswith(("ties", "dare", "magnitude")))
# DARE drops weights at random, from torch's global RNG.
RANDOM = frozenset(m for m in METHODS if m.startswith("dare"))


def merge_argument_problem(
    method: str, adapter_count: int, weights: Sequence[float], density: float | None
) -> str | None:
    """One line naming the argument that is wrong, or None; no adapter is read."""
    if method not in METHODS:
        return f"--method {method!r}: PEFT knows {', '.join(METHODS)}"
    if len(weights) != adapter_count:
        return f"--weights: {len(weights)} given for {adapter_count} adapters (one per adapter)"
    if method in USES_DENSITY:
        if density is None:
            return f"--density: method {method} needs it (the fraction of weights kept, in (0, 1])"
        if not 0.0 < density <= 1.0:
            return f"--density: must be in (0, 1], got {density}"
    elif density is not None:
        return f"--density: method {method} does not prune; drop --density or pick ties, dare_*"
    return None
