"""Import or save through a library without it pulling in packages this process doesn't use.

peft imports bitsandbytes whenever it is installed (most of peft's import time, and on
AVX512-BF16 CPUs a line about an optional kernel package); transformers' `save_pretrained`
imports DeepSpeed whenever it is installed, to unwrap a DeepSpeed engine (1.4 s, and a
warning that the accelerator is the CPU). A package marked `None` in `sys.modules` is one
`importlib.util.find_spec` reports absent, so such code skips it, only within the block.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def unseen(package: str) -> Iterator[None]:
    """Within the block, `package` looks not installed, unless it is already imported."""
    if package in sys.modules:
        yield
        return
    sys.modules[package] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if package in sys.modules and sys.modules[package] is None:
            del sys.modules[package]


@contextlib.contextmanager
def peft_without_bitsandbytes() -> Iterator[None]:
    """Import peft without bitsandbytes where no 4-bit base is loaded in this process.

    peft decides once whether bitsandbytes exists: imported this way, PEFT's own 4-bit
    layers stay off in this process. carpool uses PEFT for its config classes and to merge
    full-precision bases, never for those layers; its own 4-bit bases load through
    transformers, whose (cached) answer is taken first, so they still load.
    """
    if "peft" in sys.modules:
        yield
        return
    from transformers.utils.import_utils import is_bitsandbytes_available

    is_bitsandbytes_available()  # cached now with the true answer, for 4-bit loads later
    with unseen("bitsandbytes"):
        yield


def save_without_deepspeed(model, *args, **kwargs) -> None:
    """`model.save_pretrained(...)` of a plain model: nothing to unwrap, so no DeepSpeed."""
    with unseen("deepspeed"):
        model.save_pretrained(*args, **kwargs)
