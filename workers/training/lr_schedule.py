"""Learning-rate schedules as multipliers of the job's learning rate.

The same curves as transformers' `get_scheduler`, except that `constant`
honours `warmup_steps` (transformers splits that into two names).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """A function from the optimizer step count (0-based) to the LR multiplier."""

    def warmup(step: int) -> float | None:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return None

    def constant(step: int) -> float:
        w = warmup(step)
        return 1.0 if w is None else w

    def linear(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    def cosine(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    schedules = {"constant": constant, "linear": linear, "cosine": cosine}
    if kind not in schedules:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; expected one of {sorted(schedules)}")
    return schedules[kind]
