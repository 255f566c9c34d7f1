"""Which rows of a fused batch belong to which job."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of a fused batch, all belonging to `job`.

    `row_ids` are the rows' positions in the job's own data stream; dropout
    masks are seeded from them so a row's mask never depends on where in a
    batch, micro-batch or run it lands. `lengths` are the rows' real token
    counts: a packed micro-batch (rows end to end) needs them to find its rows.
    """

    job: str
    start: int
    end: int
    row_ids: tuple[int, ...]
    lengths: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        """The segment's positions in a packed micro-batch."""
        return sum(self.lengths)
