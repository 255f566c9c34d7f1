"""The scheduler: a pure function from a snapshot of the cluster to decisions.

Following Ray Train v2, policies only decide and the controller executes:
`schedule` starts, stops and preempts nothing. It reads plain values (queued
jobs, worker groups, free slots, per-group capacity) and returns decision
objects, so it can be tested without Ray and replayed from a logged state.

Jobs with the same base model at the same quantization (`base_quantization`)
share a worker group: one copy of the base, one fused batch. A 4-bit copy and a
full-precision copy of one base are different bases here. Policy, in the order `schedule` applies it to each queued job
(priority high to low, first-come within a priority):

1. join the fullest group of its base that still fits (fewer groups, more fusion);
2. else start a new group if the cluster has a free group slot;
3. else evict strictly lower-priority jobs from one group of its base;
4. else preempt a whole group of another base whose jobs all rank below it,
   and start a group of its own in the slot that frees.

A job that none of these places is blocked and waits. Jobs of lower priority
behind it may still join existing room (backfill) or evict jobs ranked below
themselves within a group of their base, but never start a group (by a free
slot or by preempting a whole group): that slot belongs to the blocked job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carpool.workers.spec.job_spec import QuantizationSpec

# What jobs must share to share a group: the base model and its quantization.
BaseKey = tuple[str, "QuantizationSpec | None"]


@dataclass(frozen=True)
class JobDemand:
    """What the scheduler knows of a job: its base, rank and resource needs."""

    id: str
    base_model: str
    priority: int
    seq: int  # submission order: first-come within a priority
    tokens_per_step: int  # JobSpec.tokens_per_step: an upper bound of padded tokens (pairs: 2 rows)
    memory_bytes: int  # adapter + optimizer state estimate
    quantization: QuantizationSpec | None = None  # the job's base_quantization

    @property
    def base(self) -> BaseKey:
        return (self.base_model, self.quantization)


@dataclass(frozen=True)
class GroupView:
    """A worker group holding one copy of `base_model` (at `quantization`) and its jobs."""

    id: str
    base_model: str
    jobs: tuple[JobDemand, ...]
    quantization: QuantizationSpec | None = None


@dataclass(frozen=True)
class Capacity:
    """Per-group limits from the operator config."""

    max_tokens_per_step: int
    max_adapters_per_group: int
    max_memory_bytes: int  # budget for adapters + optimizer state per group

    def __post_init__(self) -> None:
        # A limit below 1 would make every group full forever: refuse it up front.
        for name in ("max_tokens_per_step", "max_adapters_per_group", "max_memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Capacity.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ClusterView:
    free_group_slots: int  # how many more groups the cluster's resources can host now


@dataclass(frozen=True)
class StartGroup:
    group_id: str
    base_model: str
    quantization: QuantizationSpec | None = None


@dataclass(frozen=True)
class AdmitJob:
    job_id: str
    group_id: str


@dataclass(frozen=True)
class PreemptJob:
    job_id: str
    group_id: str
    reason: str


@dataclass(frozen=True)
class StopGroup:
    group_id: str


Decision = StartGroup | AdmitJob | PreemptJob | StopGroup


def fits(job: JobDemand, jobs: Sequence[JobDemand], capacity: Capacity) -> bool:
    """Whether `job` can join a group already running `jobs` (same base assumed).

    An empty group takes any one job, even one over the token or memory cap:
    such a job could never run otherwise, and it stays alone because nothing
    else fits beside it.
    """
    if len(jobs) + 1 > capacity.max_adapters_per_group:
        return False
    if not jobs:
        return True
    tokens = sum(j.tokens_per_step for j in jobs) + job.tokens_per_step
    memory = sum(j.memory_bytes for j in jobs) + job.memory_bytes
    return tokens <= capacity.max_tokens_per_step and memory <= capacity.max_memory_bytes


@dataclass
class _PlanGroup:
    """A group as the plan sees it while decisions accumulate (mutable copy)."""

    id: str
    base_model: str
    quantization: QuantizationSpec | None
    jobs: list[JobDemand]
    order: int  # input order, then creation order: the final tie-break

    @property
    def base(self) -> BaseKey:
        return (self.base_model, self.quantization)

    def idle(self) -> bool:
        return not self.jobs


def _eviction_order(job: JobDemand) -> tuple[int, int]:
    # Lowest priority goes first; among equals the latest arrival (first-come keeps its seat).
    return (job.priority, -job.seq)


class _Planner:
    """Applies the policy job by job to a private copy of the groups."""

    def __init__(
        self,
        groups: Sequence[GroupView],
        slots: int,
        capacity: Capacity,
        new_group_id: Callable[[str], str],
    ) -> None:
        self.groups = [
            _PlanGroup(g.id, g.base_model, g.quantization, list(g.jobs), i)
            for i, g in enumerate(groups)
        ]
        self.slots = slots
        self.capacity = capacity
        self.new_group_id = new_group_id
        self._next_order = len(self.groups)

    def stop_idle(self, keep_bases: set[BaseKey]) -> list[Decision]:
        """Stop idle groups whose base no queued job wants; each gives its slot back."""
        stops: list[Decision] = []
        for group in list(self.groups):
            if group.idle() and group.base not in keep_bases:
                self.groups.remove(group)
                self.slots += 1
                stops.append(StopGroup(group.id))
        return stops

    def place(self, job: JobDemand, may_start: bool) -> list[Decision] | None:
        """Decisions that place `job`, applied to the plan; None if it must wait."""
        joined = self._join(job)
        if joined is not None:
            return joined
        if may_start and self.slots > 0:
            return self._start(job)
        evicted = self._evict_same_base(job)
        if evicted is not None:
            return evicted
        if may_start:
            return self._take_other_base(job)
        return None

    def _join(self, job: JobDemand) -> list[Decision] | None:
        candidates = [
            g for g in self.groups if g.base == job.base and fits(job, g.jobs, self.capacity)
        ]
        if not candidates:
            return None

        # Fullest first: token load is what fusion shares; then adapter count, memory.
        def fullness(g: _PlanGroup) -> tuple[int, int, int, int]:
            tokens = sum(j.tokens_per_step for j in g.jobs)
            memory = sum(j.memory_bytes for j in g.jobs)
            return (-tokens, -len(g.jobs), -memory, g.order)

        group = min(candidates, key=fullness)
        group.jobs.append(job)
        return [AdmitJob(job.id, group.id)]

    def _start(self, job: JobDemand) -> list[Decision]:
        group_id = self.new_group_id(job.base_model)
        group = _PlanGroup(group_id, job.base_model, job.quantization, [job], self._next_order)
        self._next_order += 1
        self.groups.append(group)
        self.slots -= 1
        return [StartGroup(group.id, *job.base), AdmitJob(job.id, group.id)]

    def _evict_same_base(self, job: JobDemand) -> list[Decision] | None:
        """Evict lower-priority jobs from one group of its base: least important, then fewest."""
        options: list[tuple[tuple[int, int, int], _PlanGroup, list[JobDemand]]] = []
        for group in self.groups:
            if group.base != job.base:
                continue
            remaining = list(group.jobs)
            victims: list[JobDemand] = []
            lower = [j for j in group.jobs if j.priority < job.priority]
            for victim in sorted(lower, key=_eviction_order):
                remaining.remove(victim)
                victims.append(victim)
                if fits(job, remaining, self.capacity):
                    key = (max(v.priority for v in victims), len(victims), group.order)
                    options.append((key, group, victims))
                    break
        if not options:
            return None
        _, group, victims = min(options, key=lambda o: o[0])
        decisions: list[Decision] = [self._preempt(v, group, job) for v in victims]
        group.jobs.append(job)
        return [*decisions, AdmitJob(job.id, group.id)]

    def _take_other_base(self, job: JobDemand) -> list[Decision] | None:
        """Preempt a whole group of another base whose jobs all rank below `job`.

        An empty group qualifies (no job outranks `job`): its slot is worth more
        to a waiting job than to a base with nothing running.
        """
        options = [
            g
            for g in self.groups
            if g.base != job.base and all(j.priority < job.priority for j in g.jobs)
        ]
        if not options:
            return None

        # Least important work first (empty groups before any), then the least of it.
        def cost(g: _PlanGroup) -> tuple[bool, int, int, int]:
            top = max((j.priority for j in g.jobs), default=0)
            return (bool(g.jobs), top, len(g.jobs), g.order)

        group = min(options, key=cost)
        victims = sorted(group.jobs, key=_eviction_order)
        decisions: list[Decision] = [self._preempt(v, group, job) for v in victims]
        self.groups.remove(group)
        self.slots += 1
        return [*decisions, StopGroup(group.id), *self._start(job)]

    def _preempt(self, victim: JobDemand, group: _PlanGroup, job: JobDemand) -> PreemptJob:
        # Victims leave the plan for this call; the controller re-queues them.
        group.jobs.remove(victim)
        reason = f"preempted by {job.id} (priority {job.priority} > {victim.priority})"
        return PreemptJob(victim.id, group.id, reason)


def schedule(
    queued: Sequence[JobDemand],
    groups: Sequence[GroupView],
    cluster: ClusterView,
    capacity: Capacity,
    new_group_id: Callable[[str], str],
) -> list[Decision]:
    """Decide placements for `queued` jobs; the controller executes the result in order.

    Order of the output: stops of idle groups first (their slots are reused
    below), then each placed job's decisions in job order (its preemptions and
    stops before the start and admit they make room for), then stops of groups
    left idle by this plan. `new_group_id` is called only for groups started.
    """
    planner = _Planner(groups, cluster.free_group_slots, capacity, new_group_id)
    decisions = planner.stop_idle({j.base for j in queued})

    blocked_priority: int | None = None  # priority of the first job that could not be placed
    waiting_bases: set[BaseKey] = set()
    for job in sorted(queued, key=lambda j: (-j.priority, j.seq)):
        # Strict priority: a job ranked below a blocked one starts no group. With the rules
        # above this is already implied (slots never grow in this loop, and a whole group a
        # lower job could take, the blocked job would have taken); kept explicit so the rule
        # survives policy changes.
        may_start = blocked_priority is None or job.priority >= blocked_priority
        placed = planner.place(job, may_start)
        if placed is None:
            waiting_bases.add(job.base)
            if blocked_priority is None:
                blocked_priority = job.priority
            continue
        decisions.extend(placed)

    decisions.extend(planner.stop_idle(waiting_bases))
    return decisions
