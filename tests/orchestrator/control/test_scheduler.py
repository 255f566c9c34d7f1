"""The scheduler: placement, capacity, priority, preemption, idle groups, output order."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from carpool.orchestrator.control.scheduler import (
    AdmitJob,
    Capacity,
    ClusterView,
    Decision,
    GroupView,
    JobDemand,
    PreemptJob,
    StartGroup,
    StopGroup,
    schedule,
)

CAP = Capacity(max_tokens_per_step=1000, max_adapters_per_group=4, max_memory_bytes=1000)
_seq = itertools.count()


def job(
    id: str,
    base: str = "A",
    priority: int = 0,
    seq: int | None = None,
    tokens: int = 100,
    memory: int = 10,
) -> JobDemand:
    return JobDemand(id, base, priority, next(_seq) if seq is None else seq, tokens, memory)


def group(id: str, base: str = "A", *jobs: JobDemand) -> GroupView:
    return GroupView(id, base, tuple(jobs))


class Ids:
    """`new_group_id` that names groups base-1, base-2, ... and records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, base: str) -> str:
        self.calls.append(base)
        return f"{base}-{len(self.calls)}"


def run(
    queued: list[JobDemand],
    groups: Sequence[GroupView] = (),
    slots: int = 0,
    capacity: Capacity = CAP,
) -> list[Decision]:
    return schedule(queued, list(groups), ClusterView(slots), capacity, Ids())


def kinds(decisions: list[Decision]) -> list[str]:
    return [type(d).__name__ for d in decisions]


# --- placement and fusion -------------------------------------------------------------


def test_same_base_shares_one_group() -> None:
    out = run([job("a1"), job("a2")], slots=2)
    assert out == [StartGroup("A-1", "A"), AdmitJob("a1", "A-1"), AdmitJob("a2", "A-1")]


def test_different_bases_get_two_groups() -> None:
    out = run([job("a1", "A"), job("b1", "B")], slots=2)
    assert out == [
        StartGroup("A-1", "A"),
        AdmitJob("a1", "A-1"),
        StartGroup("B-2", "B"),
        AdmitJob("b1", "B-2"),
    ]


def test_job_joins_a_running_group_of_its_base() -> None:
    out = run([job("a2")], [group("g", "A", job("a1"))], slots=1)
    assert out == [AdmitJob("a2", "g")]


def test_job_placed_into_group_started_earlier_in_same_call() -> None:
    ids = Ids()
    out = schedule([job("a1"), job("b1", "B"), job("a2")], [], ClusterView(5), CAP, ids)
    assert AdmitJob("a2", "A-1") in out
    assert ids.calls == ["A", "B"]  # called only for groups actually started


@pytest.mark.parametrize(
    "capacity, first, second",
    [
        (Capacity(1000, 4, 1000), job("x1", tokens=600), job("x2", tokens=600)),  # tokens
        (Capacity(1000, 1, 1000), job("x1"), job("x2")),  # adapters
        (Capacity(1000, 4, 1000), job("x1", memory=600), job("x2", memory=600)),  # memory
    ],
    ids=["tokens", "adapters", "memory"],
)
def test_each_capacity_limit_forces_a_second_group(capacity, first, second) -> None:
    out = run([first, second], slots=2, capacity=capacity)
    assert out == [
        StartGroup("A-1", "A"),
        AdmitJob("x1", "A-1"),
        StartGroup("A-2", "A"),
        AdmitJob("x2", "A-2"),
    ]


@pytest.mark.parametrize(
    "capacity, running, queued",
    [
        (Capacity(1000, 4, 1000), job("r", tokens=600), job("q", tokens=600)),
        (Capacity(1000, 1, 1000), job("r"), job("q")),
        (Capacity(1000, 4, 1000), job("r", memory=600), job("q", memory=600)),
    ],
    ids=["tokens", "adapters", "memory"],
)
def test_each_capacity_limit_makes_a_job_wait_without_slots(capacity, running, queued) -> None:
    assert run([queued], [group("g", "A", running)], slots=0, capacity=capacity) == []


def test_exact_fit_is_admitted() -> None:
    out = run(
        [job("q", tokens=400, memory=400)], [group("g", "A", job("r", tokens=600, memory=600))]
    )
    assert out == [AdmitJob("q", "g")]


def test_prefers_the_fullest_group() -> None:
    groups = [
        group("light", "A", job("r1", tokens=100)),
        group("heavy", "A", job("r2", tokens=500)),
        group("empty", "A"),
    ]
    # The empty group, left idle with no queued job of its base, then stops.
    assert run([job("q", tokens=100)], groups) == [AdmitJob("q", "heavy"), StopGroup("empty")]


def test_oversize_job_runs_alone_in_an_empty_group() -> None:
    big, small = job("big", tokens=5000, memory=5000), job("small")
    out = run([big, small], slots=2)
    assert out == [
        StartGroup("A-1", "A"),
        AdmitJob("big", "A-1"),
        StartGroup("A-2", "A"),
        AdmitJob("small", "A-2"),
    ]


def test_oversize_job_takes_an_existing_empty_group_but_not_a_busy_one() -> None:
    big = job("big", tokens=5000)
    assert run([big], [group("busy", "A", job("r")), group("idle", "A")]) == [
        AdmitJob("big", "idle")
    ]
    assert run([big], [group("busy", "A", job("r"))]) == []


# --- priority ---------------------------------------------------------------------------


def test_higher_priority_goes_first() -> None:
    out = run([job("low", priority=0, seq=0), job("high", priority=5, seq=1)], slots=1)
    assert out == [StartGroup("A-1", "A"), AdmitJob("high", "A-1"), AdmitJob("low", "A-1")]
    cap1 = Capacity(1000, 1, 1000)
    out = run(
        [job("low", priority=0, seq=0), job("high", priority=5, seq=1)], slots=1, capacity=cap1
    )
    assert out == [StartGroup("A-1", "A"), AdmitJob("high", "A-1")]


def test_first_come_within_a_priority() -> None:
    cap1 = Capacity(1000, 1, 1000)
    out = run([job("later", seq=7), job("first", seq=3)], slots=1, capacity=cap1)
    assert out == [StartGroup("A-1", "A"), AdmitJob("first", "A-1")]


def test_output_does_not_depend_on_input_order() -> None:
    queued = [job(f"j{i}", base="AB"[i % 2], priority=i % 3, tokens=300) for i in range(10)]
    groups = [group("g", "A", job("r", priority=0, tokens=500))]
    expected = run(queued, groups, slots=2)
    for s in range(5):
        shuffled = random.Random(s).sample(queued, len(queued))
        assert run(shuffled, groups, slots=2) == expected


# --- preemption -------------------------------------------------------------------------


def test_preempts_lowest_priority_job_to_make_room() -> None:
    cap1 = Capacity(1000, 1, 1000)
    out = run([job("high", priority=5)], [group("g", "A", job("low", priority=1))], capacity=cap1)
    assert kinds(out) == ["PreemptJob", "AdmitJob"]
    assert (out[0].job_id, out[0].group_id) == ("low", "g")
    assert out[1] == AdmitJob("high", "g")


def test_no_preemption_for_equal_or_lower_priority() -> None:
    cap1 = Capacity(1000, 1, 1000)
    assert run([job("q", priority=1)], [group("g", "A", job("r", priority=1))], capacity=cap1) == []
    assert run([job("q", priority=0)], [group("g", "A", job("r", priority=1))], capacity=cap1) == []
    assert run([job("q", priority=0)], [group("g", "B", job("r", priority=1))], capacity=cap1) == []


def test_free_slot_is_used_before_preempting() -> None:
    cap1 = Capacity(1000, 1, 1000)
    out = run([job("high", priority=5)], [group("g", "A", job("low"))], slots=1, capacity=cap1)
    assert out == [StartGroup("A-1", "A"), AdmitJob("high", "A-1")]


def test_victims_are_lowest_priority_then_latest_seq() -> None:
    cap3 = Capacity(1000, 3, 1000)
    running = [
        job("p1-old", priority=1, seq=1),
        job("p1-new", priority=1, seq=2),
        job("p3", priority=3, seq=0),
    ]
    out = run([job("high", priority=5)], [group("g", "A", *running)], capacity=cap3)
    assert [d.job_id for d in out if isinstance(d, PreemptJob)] == ["p1-new"]
    assert out[-1] == AdmitJob("high", "g")


def test_evicts_several_jobs_until_it_fits() -> None:
    running = [
        job("r0", priority=0, tokens=300),
        job("r1", priority=1, tokens=300),
        job("r2", priority=2, tokens=300),
    ]
    out = run([job("high", priority=5, tokens=500)], [group("g", "A", *running)])
    assert [d.job_id for d in out if isinstance(d, PreemptJob)] == ["r0", "r1"]
    assert out[-1] == AdmitJob("high", "g")


def test_no_eviction_unless_it_makes_the_job_fit() -> None:
    running = [job("keep", priority=9, tokens=800), job("low", priority=0, tokens=100)]
    assert run([job("high", priority=5, tokens=500)], [group("g", "A", *running)]) == []


def test_preempts_a_whole_group_of_another_base() -> None:
    b_jobs = [job("b1", "B", priority=1, seq=1), job("b2", "B", priority=2, seq=2)]
    out = run([job("high", "A", priority=5)], [group("gb", "B", *b_jobs)])
    assert kinds(out) == ["PreemptJob", "PreemptJob", "StopGroup", "StartGroup", "AdmitJob"]
    assert {(d.job_id, d.group_id) for d in out[:2]} == {("b1", "gb"), ("b2", "gb")}
    assert out[2:] == [StopGroup("gb"), StartGroup("A-1", "A"), AdmitJob("high", "A-1")]


def test_no_whole_group_preemption_if_any_job_ranks_as_high() -> None:
    b_jobs = [job("b1", "B", priority=1), job("b2", "B", priority=5)]
    assert run([job("high", "A", priority=5)], [group("gb", "B", *b_jobs)]) == []


def test_same_base_eviction_preferred_over_whole_group_preemption() -> None:
    cap1 = Capacity(1000, 1, 1000)
    groups = [group("gb", "B", job("b", "B", priority=0)), group("ga", "A", job("a", priority=0))]
    out = run([job("high", priority=5)], groups, capacity=cap1)
    assert kinds(out) == ["PreemptJob", "AdmitJob"]
    assert out[0].job_id == "a" and out[1] == AdmitJob("high", "ga")


def test_victims_leave_the_plan_and_new_admits_are_not_victims() -> None:
    cap1 = Capacity(1000, 1, 1000)
    queued = [job("high", priority=5), job("mid", priority=3)]
    out = run(queued, [group("g", "A", job("low", priority=0))], capacity=cap1)
    assert kinds(out) == ["PreemptJob", "AdmitJob"]
    assert out[0].job_id == "low" and out[1] == AdmitJob("high", "g")


# --- strict priority and backfill -------------------------------------------------------


def test_no_start_for_lower_priority_job_behind_a_blocked_one() -> None:
    groups = [group("gb", "B", job("b", "B", priority=9, tokens=100))]
    queued = [
        job("blocked", "A", priority=5),  # no slot, nothing it may preempt
        job("other", "C", priority=1),  # would need a new group: must not start one
        job("backfill", "B", priority=1),  # fits in existing room: allowed
    ]
    assert run(queued, groups, slots=0) == [AdmitJob("backfill", "gb")]


# --- idle groups ------------------------------------------------------------------------


def test_idle_group_is_stopped() -> None:
    assert run([], [group("g", "A")]) == [StopGroup("g")]


def test_idle_group_kept_for_a_queued_job_of_its_base() -> None:
    assert run([job("a1")], [group("g", "A")]) == [AdmitJob("a1", "g")]


def test_busy_group_is_not_stopped() -> None:
    assert run([], [group("g", "A", job("r"))]) == []


def test_idle_group_slot_is_reused_in_the_same_call() -> None:
    out = run([job("b1", "B")], [group("ga", "A")], slots=0)
    assert out == [StopGroup("ga"), StartGroup("B-1", "B"), AdmitJob("b1", "B-1")]


def test_idle_group_stopped_when_its_job_went_to_a_fuller_group() -> None:
    groups = [group("idle", "A"), group("busy", "A", job("r"))]
    assert run([job("a1")], groups) == [AdmitJob("a1", "busy"), StopGroup("idle")]


def test_idle_group_yields_to_a_higher_priority_job_of_another_base() -> None:
    queued = [job("a-high", "A", priority=5), job("b-low", "B", priority=1)]
    out = run(queued, [group("gb", "B")], slots=0)
    assert out == [StopGroup("gb"), StartGroup("A-1", "A"), AdmitJob("a-high", "A-1")]


# --- configuration ----------------------------------------------------------------------


def test_capacity_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_adapters_per_group"):
        Capacity(max_tokens_per_step=10, max_adapters_per_group=0, max_memory_bytes=10)
