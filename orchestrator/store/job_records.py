"""What the queue holds: job states, the records it returns, and its typed errors.

Plain data, standard library only; the errors keep their fields in `args` so they
pickle across Ray actors.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import Enum
from typing import Any


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"  # a sweep's trial its search stopped early: an end, not an error


FINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PRUNED}
)
# Ends that leave an adapter to fetch and are no error for `carpool wait`.
GOOD_ENDS: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.PRUNED})


class UnknownJobError(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError's own __str__ would repr() the message again
        return f"unknown job id {self.job_id!r}"


class InvalidTransitionError(ValueError):
    # The fields go to super().__init__ so the exception pickles across Ray actors.
    def __init__(self, job_id: str, state: JobState, transition: str) -> None:
        super().__init__(job_id, state, transition)
        self.job_id, self.state, self.transition = job_id, JobState(state), transition

    def __str__(self) -> str:
        return f"job {self.job_id!r} is {self.state.value}: cannot {self.transition}"


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    spec: dict
    base_model: str
    priority: int
    state: JobState
    submitted_at: float
    updated_at: float
    attempts: int
    group: str | None
    checkpoint: str | None
    checkpoint_step: int
    step: int
    total_steps: int | None
    loss: float | None
    tokens_per_second: float | None
    metrics: dict
    error: str | None
    cancel_requested: bool
    seq: int
    state_seq: int  # when its state or cancel request last changed (see JobQueue.changed_since)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        # Iterating a Row yields values, not keys.
        return cls.from_columns(dict(zip(row.keys(), row, strict=True)))

    @classmethod
    def from_columns(cls, d: dict[str, Any]) -> JobRecord:
        d["group"] = d.pop("group_id")
        d["state"] = JobState(d["state"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        d["spec"], d["metrics"] = json.loads(d["spec"]), json.loads(d["metrics"])
        return cls(**d)


class SweepExistsError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"a sweep named {self.name!r} exists already: choose another name"


class UnknownSweepError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown sweep {self.name!r}"


@dataclass(frozen=True)
class SweepRecord:
    name: str
    spec: dict  # the sweep file as parsed (SweepSpec's fields)
    template: dict  # the template job spec every trial starts from
    path: str  # the sweep file's
    state: str  # running | done | cancelled
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SweepRecord:
        d = dict(zip(row.keys(), row, strict=True))
        d["spec"], d["template"] = json.loads(d["spec"]), json.loads(d["template"])
        return cls(**d)


@dataclass(frozen=True)
class TrialRecord:
    sweep: str
    number: int
    params: dict
    reported: int  # history entries already told to the search
    best: float | None  # the best (lowest) metric reported so far
    told: bool  # the search knows how the trial ended
    job: JobRecord
