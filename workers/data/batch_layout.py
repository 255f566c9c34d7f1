"""The operator's choice of how a fused micro-batch lays out its rows.

Kept free of torch so the CLI and the control plane can name the choices
without loading it. The layouts themselves are `carpool.workers.data.fused_batch`'s.
"""

from __future__ import annotations

from typing import Literal, get_args

# padded: [rows, longest row]; packed: [1, real tokens] with per-row attention.
# auto: packed where the model takes it (`carpool.workers.data.row_attention`), else padded.
# Measured in BENCHMARKS.md ("Packed rows").
BatchLayout = Literal["auto", "padded", "packed"]
BATCH_LAYOUTS: tuple[str, ...] = get_args(BatchLayout)


def check_batch_layout(setting: str) -> str:
    """`setting` if it names a layout, else ValueError listing the choices."""
    if setting not in BATCH_LAYOUTS:
        raise ValueError(f"batch_layout must be one of {', '.join(BATCH_LAYOUTS)}, got {setting!r}")
    return setting
