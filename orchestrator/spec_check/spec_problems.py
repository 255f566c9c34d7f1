"""A problem in a job spec, and the error that lists them.

Apart from `validation` (which loads torch and transformers) so the CLI can
recognise the error, and the controller raise it, without loading either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpecProblem:
    source: str  # the file (or other origin) of the spec
    field: str  # dotted, e.g. "adapter.r"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.message}"


class SpecValidationError(ValueError):
    """One or more problems in one or more specs; `str()` lists one per line."""

    def __init__(self, problems: Sequence[SpecProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self):  # pickle with the problems, not the joined message
        return (type(self), (self.problems,))
