"""The pruners a sweep may name, and the check of their options.

Its own module so that the sweep file's checker (`sweep_spec`) and the search
(`sweep_search`, which needs the spec's types) both use it without importing
each other.
"""

from __future__ import annotations

import inspect
from typing import Any

import optuna

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "median": optuna.pruners.MedianPruner,
    "none": optuna.pruners.NopPruner,
}


def pruner_option_problems(pruner: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for options the pruner does not take or refuses; empty when fine."""
    cls = PRUNERS[pruner]
    accepted = [n for n in inspect.signature(cls).parameters if n != "self"]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        takes = ", ".join(accepted) or "no options"
        return [(f"pruner_options.{key}", f"{pruner} takes: {takes}") for key in unknown]
    try:
        cls(**options)
    except (TypeError, ValueError) as e:
        return [("pruner_options", f"{pruner}: {e}")]
    return []
