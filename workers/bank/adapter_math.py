"""The operator's choice of how the bank computes LoRA terms, and what `auto` means.

Kept free of torch so the CLI and the control plane can name the choices
without loading it. The paths themselves live in `AdapterBank` (the loop) and
`carpool.workers.bank.grouped_lora` (the grouped ones).
"""

from __future__ import annotations

from typing import Literal, get_args

# loop: two matmuls per job segment (the reference the tests compare with);
# bmm, grouped_mm: one computation over all segments, ops constant in the job count.
AdapterMath = Literal["auto", "loop", "bmm", "grouped_mm"]
ADAPTER_MATHS: tuple[str, ...] = get_args(AdapterMath)

# `auto` per device type, from benchmarks/engine.py --adapter-math (BENCHMARKS.md;
# round time against the loop's, 2 shared CPU cores, four clean runs each):
# - cpu: "bmm". K=32 jobs x 1 row x 64 tokens (16 segments per micro-batch):
#   0.88-0.90x; K=8 x 4 rows x 128 tokens (2 segments): 0.96-1.07x, parity.
#   `grouped_mm` matched it (0.87-0.93x; 0.98x) but for two runs at 1.47x and
#   3.22x, and has no float64 kernel on CPU; on CPU it runs one mm per group.
#   Yet `auto` keeps "loop" on CPU for now: a 600-step job preempted and resumed
#   in a group of two ranks (tests/orchestrator/runtime/test_group_integration.py) drifted past the 1e-4
#   bar against one rank under bmm, where the loop stays within it. Until that
#   drift is explained, the default path is the one every long test pins.
# - anything else (cuda): "bmm". The LoRA math runs in float32 beside a bf16
#   base (`adapter_dtype`) and torch's fast `_grouped_mm` kernel takes bf16
#   only; `bmm` is one launch per matmul whatever K. Not yet measured on a GPU.
_AUTO = {"cpu": "loop"}
_AUTO_ELSEWHERE = "bmm"


def check_adapter_math(setting: str) -> str:
    """`setting` if it names a path, else ValueError listing the choices."""
    if setting not in ADAPTER_MATHS:
        raise ValueError(f"adapter_math must be one of {', '.join(ADAPTER_MATHS)}, got {setting!r}")
    return setting


def resolve_adapter_math(setting: str, device_type: str) -> str:
    """The path `setting` means on a device of this type: `auto` becomes the measured choice."""
    if setting != "auto":
        return setting
    return _AUTO.get(device_type, _AUTO_ELSEWHERE)
