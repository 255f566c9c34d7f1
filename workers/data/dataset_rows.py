"""A labelled row, the unit every dataset format tokenizes to.

Labels follow the HF causal-LM convention: the same length as `input_ids`, unshifted (the
model shifts), IGNORE_INDEX wherever the token is not trained.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
