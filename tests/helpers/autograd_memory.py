"""What autograd keeps for the backward, in bytes: a deterministic measure of activation memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class KeptBytes:
    def __init__(self) -> None:
        # Held, not just counted: a storage freed mid-step could have its address
        # reused by a later one, which a count keyed by address would then miss.
        self.storages: dict[int, torch.Tensor] = {}

    @property
    def total(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.storages.values())


@contextmanager
def kept_for_backward() -> Iterator[KeptBytes]:
    """Within the block, record every tensor autograd saves (each storage once)."""
    kept = KeptBytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.storages.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
