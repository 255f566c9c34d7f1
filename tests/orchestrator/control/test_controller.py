"""The controller loop, stepped one tick at a time over fake worker groups (no Ray;
see tests/helpers/fake_groups.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from carpool.orchestrator.control import controller as controller_module
from carpool.orchestrator.control.controller import Controller, GroupFailedError
from carpool.orchestrator.control.scheduler import schedule
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobRecord, JobState
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.spec.job_spec import JobInputError, JobSpec, QuantizationSpec

from tests.helpers.fake_groups import (
    Event,
    FakeGroup,
    FakeGroupFactory,
    adapter_uri,
    ckpt_uri,
    make_controller,
    run_to_end,
)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny base (narrower than `tiny_base`): jobs on it need groups of their own."""
    return build_tiny_base(
        tmp_path_factory.mktemp("second-base"), hidden_size=32, intermediate_size=64
    )


@pytest.fixture
def spec(tiny_base: Path, datasets: dict[str, Path]) -> Callable[..., JobSpec]:
    def make(
        name: str,
        *,
        steps: int = 3,
        save_steps: int = 100,
        priority: int = 0,
        base: Path = tiny_base,
        eval_steps: int | None = None,
    ) -> JobSpec:
        raw = {
            "name": name,
            "base_model": str(base),
            "dataset": {"path": str(datasets["text"])},
            "training": {
                "max_steps": steps,
                "save_steps": save_steps,
                "batch_size": 2,
                "max_seq_length": 32,
            },
            "priority": priority,
        }
        if eval_steps is not None:
            raw["training"]["eval_steps"] = eval_steps
            raw["eval_dataset"] = {"path": str(datasets["prompt_completion"])}
        return JobSpec.model_validate(raw)

    return make


@pytest.fixture
def queue(tmp_path: Path):
    q = JobQueue(tmp_path / "queue.sqlite")
    yield q
    q.close()


@pytest.fixture
def factory() -> FakeGroupFactory:
    return FakeGroupFactory()


def log_text(queue: JobQueue, job_id: str) -> str:
    return "\n".join(queue.logs(job_id))


# -- placement and progress -------------------------------------------------------------


def test_jobs_of_one_base_share_a_group_and_each_base_gets_its_own(
    queue, factory, spec, tiny_base, second_base
) -> None:
    controller = make_controller(queue, factory)
    a1, a2, b1 = controller.submit(
        [spec("a1", steps=2), spec("a2", steps=3), spec("b1", steps=2, base=second_base)]
    )

    controller.tick()

    assert len(factory.groups) == 2
    by_base = {g.base_model: g for g in factory.groups}
    assert set(by_base[str(tiny_base)].jobs) == {a1, a2}
    assert set(by_base[str(second_base)].jobs) == {b1}
    first = queue.get(a1)
    assert (first.state, first.step, first.total_steps, first.loss) == (RUNNING, 1, 2, 1.0)

    run_to_end(controller)

    assert len(factory.groups) == 2  # no group was started after the first tick
    for job_id, steps, base in [(a1, 2, tiny_base), (a2, 3, tiny_base), (b1, 2, second_base)]:
        record = queue.get(job_id)
        assert (record.state, record.step, record.total_steps) == (SUCCEEDED, steps, steps)
        log = log_text(queue, job_id)
        assert f"started in group {by_base[str(base)].group_id}" in log
        assert f"succeeded: adapter at {adapter_uri(job_id)}" in log


def test_job_submitted_while_a_group_runs_joins_that_group_between_rounds(
    queue, factory, spec
) -> None:
    controller = make_controller(queue, factory)
    (a,) = controller.submit([spec("a", steps=5)])
    controller.tick()
    controller.tick()
    (group,) = factory.groups
    assert queue.get(a).step == 2

    (b,) = controller.submit([spec("b", steps=2)])
    mark = len(factory.events)
    controller.tick()

    assert factory.groups == [group]  # no new group
    gid = group.group_id
    # Admitted before the round; `a` is neither removed nor re-added, so it keeps its step.
    assert factory.since(mark) == [
        Event(gid, "add_job", b, None),
        Event(gid, "start_round"),
        Event(gid, "finish_round"),
    ]
    assert (queue.get(a).step, queue.get(b).step) == (3, 1)

    controller.tick()
    assert (queue.get(a).step, queue.get(b).state) == (4, SUCCEEDED)


def test_cancel_removes_a_running_job_without_checkpoint_and_others_go_on(
    queue, factory, spec
) -> None:
    controller = make_controller(queue, factory)
    a, b = controller.submit([spec("a", steps=5), spec("b", steps=5)])
    controller.tick()
    (group,) = factory.groups

    queue.request_cancel(a)
    mark = len(factory.events)
    controller.tick()

    gid = group.group_id
    assert factory.since(mark) == [
        Event(gid, "remove_job", a, False),  # before the round, without a checkpoint
        Event(gid, "start_round"),
        Event(gid, "finish_round"),
    ]
    assert (queue.get(a).state, queue.get(a).step) == (CANCELLED, 1)
    assert (queue.get(b).state, queue.get(b).step) == (RUNNING, 2)
    assert "cancelled" in log_text(queue, a)

    run_to_end(controller)
    assert (queue.get(a).state, queue.get(a).step) == (CANCELLED, 1)
    assert queue.get(b).state == SUCCEEDED
    assert len(factory.calls("remove_job")) == 1


# -- preemption -------------------------------------------------------------------------


def test_higher_priority_job_preempts_a_lower_one_which_later_resumes_from_its_checkpoint(
    queue, factory, spec
) -> None:
    controller = make_controller(queue, factory, max_groups=1, max_adapters_per_group=1)
    (low,) = controller.submit([spec("low", steps=5, priority=0)])  # no periodic checkpoint
    controller.tick()
    controller.tick()
    (group,) = factory.groups
    gid = group.group_id

    (high,) = controller.submit([spec("high", steps=2, priority=5)])
    mark = len(factory.events)
    controller.tick()

    assert factory.since(mark) == [
        Event(gid, "remove_job", low, True),  # checkpointed on the way out
        Event(gid, "add_job", high, None),
        Event(gid, "start_round"),
        Event(gid, "finish_round"),
    ]
    record = queue.get(low)
    assert record.state == QUEUED
    assert (record.checkpoint, record.checkpoint_step, record.step) == (ckpt_uri(low, 2), 2, 2)
    assert "preempted by" in log_text(queue, low)
    assert (record.metrics["preemptions"], record.metrics["requeues"]) == (1, 1)
    assert (queue.get(high).state, queue.get(high).step) == (RUNNING, 1)

    controller.tick()  # high finishes; its group was full, so low waited
    assert (queue.get(high).state, queue.get(low).state) == (SUCCEEDED, QUEUED)

    mark = len(factory.events)
    controller.tick()

    assert factory.groups == [group]  # the idle group is reused, not restarted
    assert factory.since(mark) == [
        Event(gid, "add_job", low, ckpt_uri(low, 2)),
        Event(gid, "start_round"),
        Event(gid, "finish_round"),
    ]
    assert (queue.get(low).state, queue.get(low).step) == (RUNNING, 3)
    assert f"resumed from step 2 in group {gid}" in log_text(queue, low)

    run_to_end(controller)
    assert (queue.get(low).state, queue.get(low).step) == (SUCCEEDED, 5)


# -- failures ---------------------------------------------------------------------------


def test_group_failure_requeues_its_jobs_to_resume_from_their_last_checkpoint(
    queue, factory, spec
) -> None:
    factory.fail_group(0, at_round=3)
    controller = make_controller(queue, factory)
    a, b = controller.submit([spec("a", steps=5, save_steps=2), spec("b", steps=5, save_steps=2)])
    controller.tick()
    controller.tick()  # checkpoints at step 2
    controller.tick()  # round 3 fails

    failed = factory.groups[0]
    assert failed.is_shut_down
    assert controller.groups == {}
    for job_id in (a, b):
        record = queue.get(job_id)
        assert (record.state, record.attempts) == (QUEUED, 1)
        assert (record.checkpoint, record.step) == (ckpt_uri(job_id, 2), 2)
        assert f"group {failed.group_id} failed; retrying from checkpoint" in log_text(
            queue, job_id
        )
        # Requeued, not preempted: a lost group is no preemption.
        assert record.metrics["requeues"] == 1 and "preemptions" not in record.metrics

    controller.tick()

    assert len(factory.groups) == 2
    retry = factory.groups[1]
    assert {e.job: e.detail for e in factory.calls("add_job") if e.group == retry.group_id} == {
        a: ckpt_uri(a, 2),
        b: ckpt_uri(b, 2),
    }
    run_to_end(controller)
    for job_id in (a, b):
        record = queue.get(job_id)
        assert (record.state, record.step, record.attempts) == (SUCCEEDED, 5, 2)
    assert retry.rounds == 3  # steps 3..5: nothing before the checkpoint was redone


def test_history_of_steps_redone_after_a_group_failure_is_recorded_once(
    queue, factory, spec
) -> None:
    factory.fail_group(0, at_round=4)
    controller = make_controller(queue, factory)
    (a,) = controller.submit([spec("a", steps=5, save_steps=2)])
    run_to_end(controller)  # steps 1-3, the failure, then steps 3-5 from the checkpoint

    assert queue.get(a).state == SUCCEEDED
    assert queue.history(a) == [{"loss": 1.0 / step, "step": step} for step in range(1, 6)]


def test_group_failure_with_attempts_exhausted_fails_the_job(queue, factory, spec) -> None:
    factory.fail_group(0, at_round=1)
    factory.fail_group(1, at_round=1)
    controller = make_controller(queue, factory, max_attempts=2)
    (a,) = controller.submit([spec("a", steps=5)])

    controller.tick()
    assert (queue.get(a).state, queue.get(a).attempts) == (QUEUED, 1)

    controller.tick()
    record = queue.get(a)
    assert (record.state, record.attempts) == (FAILED, 2)
    assert f"group {factory.groups[1].group_id} failed; out of attempts" in record.error

    assert controller.tick() is False
    assert len(factory.groups) == 2  # not retried again
    assert all(g.is_shut_down for g in factory.groups)


def test_add_job_error_fails_only_that_job(queue, factory, spec) -> None:
    factory.reject["bad"] = JobInputError("bad", "dataset", "data.jsonl:3: invalid JSON")
    controller = make_controller(queue, factory)
    good, bad = controller.submit([spec("good", steps=3), spec("bad", steps=3)])

    controller.tick()

    record = queue.get(bad)
    assert record.state == FAILED
    assert record.error == "dataset: data.jsonl:3: invalid JSON"
    assert "failed to start: dataset: data.jsonl:3: invalid JSON" in log_text(queue, bad)
    assert (queue.get(good).state, queue.get(good).step) == (RUNNING, 1)

    run_to_end(controller)
    assert queue.get(good).state == SUCCEEDED
    assert queue.get(bad).state == FAILED
    assert len(factory.calls("add_job", bad)) == 1  # its own fault: never retried
    assert len(factory.groups) == 1


def test_job_a_round_does_not_report_leaves_its_group_and_is_requeued(queue, factory, spec) -> None:
    factory.drop.add("lost")
    controller = make_controller(queue, factory)
    lost, kept = controller.submit([spec("lost", steps=3, save_steps=1), spec("kept", steps=3)])

    controller.tick()

    (group,) = factory.groups
    gid = group.group_id
    assert factory.calls("remove_job") == [Event(gid, "remove_job", lost, False)]
    record = queue.get(lost)
    assert (record.state, record.step, record.checkpoint) == (QUEUED, 0, None)
    assert f"requeued: group {gid} reported no result for it in a round" in log_text(queue, lost)
    assert (queue.get(kept).state, queue.get(kept).step) == (RUNNING, 1)

    factory.drop.clear()
    run_to_end(controller)
    assert (queue.get(lost).state, queue.get(lost).attempts) == (SUCCEEDED, 2)
    assert queue.get(kept).state == SUCCEEDED


def test_job_never_reported_fails_once_out_of_attempts(queue, factory, spec) -> None:
    factory.drop.add("lost")
    controller = make_controller(queue, factory, max_attempts=2)
    (lost,) = controller.submit([spec("lost", steps=3)])

    controller.tick()
    controller.tick()

    gid = factory.groups[0].group_id
    record = queue.get(lost)
    assert (record.state, record.attempts) == (FAILED, 2)
    assert record.error == f"group {gid} reported no result for it in a round; out of attempts"
    assert f"failed: {record.error}" in log_text(queue, lost)
    assert controller.tick() is False


@pytest.mark.parametrize(
    "error", [RuntimeError("CUDA out of memory"), ValueError("a bug in carpool")], ids=repr
)
def test_internal_error_while_starting_a_job_is_retried_then_failed_as_internal(
    queue, factory, spec, caplog, error
) -> None:
    factory.reject["a"] = error
    controller = make_controller(queue, factory, max_attempts=2)
    a, b = controller.submit([spec("a"), spec("b")])
    what = f"{type(error).__name__}: {error}"

    controller.tick()

    assert (queue.get(a).state, queue.get(a).attempts) == (QUEUED, 1)
    assert f"requeued: internal error while starting: {what}" in log_text(queue, a)
    (logged,) = [r for r in caplog.records if "internal error while starting" in r.getMessage()]
    assert logged.exc_info[1] is error  # with its traceback

    controller.tick()

    record = queue.get(a)
    assert (record.state, record.attempts) == (FAILED, 2)
    assert record.error == f"internal error after 2 attempts: {what}"
    assert len(factory.calls("add_job", a)) == 2
    run_to_end(controller)
    assert queue.get(b).state == SUCCEEDED


def test_errors_that_ray_wraps_are_told_apart_by_their_cause(queue, factory, spec) -> None:
    from ray.exceptions import RayTaskError

    def raised_in_an_actor(error: Exception) -> Exception:
        return RayTaskError("add_job", "Traceback (most recent call last): ...", error)

    factory.reject["bad"] = raised_in_an_actor(JobInputError("bad", "init_from", "no r"))
    factory.reject["bug"] = raised_in_an_actor(RuntimeError("boom")).as_instanceof_cause()
    controller = make_controller(queue, factory)
    bad, bug = controller.submit([spec("bad"), spec("bug")])

    controller.tick()

    assert (queue.get(bad).state, queue.get(bad).error) == (FAILED, "init_from: no r")
    assert queue.get(bug).state == QUEUED
    assert "internal error while starting: RuntimeError: boom" in log_text(queue, bug)


# -- shutdown, restart, idle groups -----------------------------------------------------


def test_shutdown_checkpoints_running_jobs_and_a_restarted_controller_resumes_them(
    tmp_path, spec
) -> None:
    path = tmp_path / "queue.sqlite"
    queue, factory = JobQueue(path), FakeGroupFactory()
    controller = make_controller(queue, factory)
    a, b = controller.submit([spec("a", steps=5), spec("b", steps=5)])  # no periodic checkpoints
    controller.tick()
    controller.tick()
    mark = len(factory.events)

    controller.shutdown()

    (group,) = factory.groups
    gid = group.group_id
    *removes, last = factory.since(mark)
    assert set(removes) == {Event(gid, "remove_job", a, True), Event(gid, "remove_job", b, True)}
    assert last == Event(gid, "shutdown")
    assert controller.groups == {}
    for job_id in (a, b):
        record = queue.get(job_id)
        assert (record.state, record.checkpoint, record.step) == (QUEUED, ckpt_uri(job_id, 2), 2)
        assert record.metrics["requeues"] == 1 and "preemptions" not in record.metrics
    queue.close()

    with JobQueue(path) as reopened:
        factory2 = FakeGroupFactory()
        restarted = make_controller(reopened, factory2)
        restarted.tick()
        (group2,) = factory2.groups
        assert {e.job: e.detail for e in factory2.calls("add_job")} == {
            a: ckpt_uri(a, 2),
            b: ckpt_uri(b, 2),
        }
        run_to_end(restarted)
        for job_id in (a, b):
            assert (reopened.get(job_id).state, reopened.get(job_id).step) == (SUCCEEDED, 5)
        assert group2.rounds == 3


def test_restart_after_a_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, spec) -> None:
    path = tmp_path / "queue.sqlite"
    queue = JobQueue(path)
    crashed = make_controller(queue, FakeGroupFactory())
    (a,) = crashed.submit([spec("a", steps=5, save_steps=2)])
    for _ in range(3):
        crashed.tick()
    assert (queue.get(a).state, queue.get(a).step) == (RUNNING, 3)
    queue.close()  # no shutdown: the controller process died

    with JobQueue(path) as reopened:
        factory = FakeGroupFactory()
        restarted = make_controller(reopened, factory)
        assert (reopened.get(a).state, reopened.get(a).step) == (QUEUED, 2)  # step 3 is lost
        restarted.tick()
        assert factory.calls("add_job") == [
            Event(factory.groups[0].group_id, "add_job", a, ckpt_uri(a, 2))
        ]
        assert reopened.get(a).step == 3
        run_to_end(restarted)
        assert reopened.get(a).state == SUCCEEDED


def crash_when_a_job_succeeds(path: Path) -> None:
    """Fault injection in the queue file: any write marking a job succeeded aborts,
    as if the controller died right there."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER crash BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'succeeded'"
            " BEGIN SELECT RAISE(ABORT, 'controller crashed'); END"
        )


def test_controller_stopped_while_recording_the_final_step_records_none_of_it(
    tmp_path, spec
) -> None:
    path = tmp_path / "queue.sqlite"
    queue = JobQueue(path)
    crashed = make_controller(queue, FakeGroupFactory())
    (a,) = crashed.submit([spec("a", steps=3, save_steps=1)])
    crashed.tick()
    crashed.tick()
    crash_when_a_job_succeeds(path)
    with pytest.raises(sqlite3.IntegrityError, match="controller crashed"):
        crashed.tick()  # the final round: step 3, its checkpoint and the adapter
    assert crashed.checkpoints.deleted == []  # the checkpoint to resume from stays
    queue.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER crash")

    with JobQueue(path) as reopened:
        record = reopened.get(a)
        # Neither the final step nor its checkpoint was recorded without the success.
        assert (record.state, record.step, record.checkpoint) == (RUNNING, 2, ckpt_uri(a, 2))
        factory = FakeGroupFactory()
        restarted = make_controller(reopened, factory)
        run_to_end(restarted)
        assert [e.detail for e in factory.calls("add_job")] == [ckpt_uri(a, 2)]
        assert (reopened.get(a).state, reopened.get(a).step) == (SUCCEEDED, 3)
        assert restarted.checkpoints.deleted == [(a, SUCCEEDED)]


def test_job_resumed_from_its_final_checkpoint_succeeds_at_admission(tmp_path, spec) -> None:
    path = tmp_path / "queue.sqlite"
    queue = JobQueue(path)
    crashed = make_controller(queue, FakeGroupFactory())
    (a,) = crashed.submit([spec("a", steps=3, save_steps=1)])
    crashed.tick()
    crashed.tick()
    # What a controller that recorded the final checkpoint and the success in two
    # transactions left when it died between them.
    queue.record_progress(
        a, step=3, total_steps=3, loss=0.3, tokens_per_second=1.0, checkpoint=ckpt_uri(a, 3)
    )
    queue.close()

    with JobQueue(path) as reopened:
        factory = FakeGroupFactory()
        restarted = make_controller(reopened, factory)
        restarted.tick()
        (group,) = factory.groups
        assert factory.calls("add_job") == [Event(group.group_id, "add_job", a, ckpt_uri(a, 3))]
        record = reopened.get(a)
        assert (record.state, record.step) == (SUCCEEDED, 3)
        assert f"succeeded: adapter at {adapter_uri(a)}" in log_text(reopened, a)
        assert factory.calls("start_round") == []  # no round was needed
        assert restarted.checkpoints.deleted == [(a, SUCCEEDED)]  # after the success, not before
        assert restarted.tick() is False


def test_idle_group_is_stopped_once_no_job_of_its_base_remains(
    queue, factory, spec, second_base
) -> None:
    controller = make_controller(queue, factory)
    controller.submit([spec("a", steps=1), spec("b", steps=3, base=second_base)])
    controller.tick()  # a finishes in this round
    group_a, group_b = factory.groups
    assert group_a.jobs == {} and not group_a.is_shut_down  # stopped by the next decision

    controller.tick()
    assert group_a.is_shut_down and not group_b.is_shut_down
    assert set(controller.groups) == {group_b.group_id}

    controller.tick()  # b finishes
    assert not group_b.is_shut_down
    assert controller.tick() is False
    assert group_b.is_shut_down
    assert controller.groups == {}
    assert [e.group for e in factory.calls("shutdown")] == [group_a.group_id, group_b.group_id]


def test_only_a_succeeded_job_has_its_checkpoints_deleted_once_its_success_is_recorded(
    queue, factory, spec
) -> None:
    factory.reject["bad"] = JobInputError("bad", "dataset", "data.jsonl:3: invalid JSON")
    controller = make_controller(queue, factory)
    done, cancelled, bad = controller.submit(
        [spec("done", steps=2, save_steps=1), spec("cancelled", steps=5, save_steps=1), spec("bad")]
    )
    controller.tick()
    assert controller.checkpoints.deleted == []

    controller.tick()  # `done` takes its last step
    assert controller.checkpoints.deleted == [(done, SUCCEEDED)]

    queue.request_cancel(cancelled)
    run_to_end(controller)
    assert (queue.get(cancelled).state, queue.get(bad).state) == (CANCELLED, FAILED)
    assert controller.checkpoints.deleted == [(done, SUCCEEDED)]


def test_tick_says_whether_a_group_ran_a_round(queue, factory, spec) -> None:
    controller = make_controller(queue, factory, max_groups=0)
    assert controller.tick() is False  # nothing queued
    (a,) = controller.submit([spec("a", steps=2)])
    assert controller.tick() is False  # queued, but no slot for a group
    assert queue.get(a).state == QUEUED

    controller.free_group_slots = lambda running: 1 - running
    assert controller.tick() is True
    assert controller.tick() is True  # the round in which it finishes
    assert queue.get(a).state == SUCCEEDED
    assert controller.tick() is False


def test_operator_checkpoint_interval_overrides_the_jobs_save_steps(queue, factory, spec) -> None:
    controller = make_controller(queue, factory, checkpoint_every_steps=2)
    (a,) = controller.submit([spec("a", steps=3, save_steps=100)])
    controller.tick()
    controller.tick()

    (group,) = factory.groups
    assert group.configs[a].training.save_steps == 2
    assert (queue.get(a).checkpoint, queue.get(a).checkpoint_step) == (ckpt_uri(a, 2), 2)


# -- a group lost between rounds: known bugs --------------------------------------------


def test_job_admitted_to_a_group_that_died_is_requeued(queue, factory, spec) -> None:
    controller = make_controller(queue, factory)
    (a,) = controller.submit([spec("a", steps=3)])
    controller.tick()
    factory.groups[0].dead = True  # its node is lost between rounds
    (b,) = controller.submit([spec("b", steps=3)])

    controller.tick()  # b is admitted to the dead group: add_job raises GroupFailedError

    assert queue.get(a).state == QUEUED
    assert queue.get(b).state == QUEUED
    run_to_end(controller)
    assert (queue.get(a).state, queue.get(b).state) == (SUCCEEDED, SUCCEEDED)


def test_group_that_dies_while_starting_requeues_every_job_sent_to_it(queue, factory, spec) -> None:
    factory.fail_group(0, at_round=0)  # e.g. a rank cannot load the base
    controller = make_controller(queue, factory)
    a, b = controller.submit([spec("a", steps=2), spec("b", steps=2)])

    controller.tick()

    assert (queue.get(a).state, queue.get(b).state) == (QUEUED, QUEUED)
    run_to_end(controller)
    assert (queue.get(a).state, queue.get(b).state) == (SUCCEEDED, SUCCEEDED)
    assert len(factory.groups) == 2


def test_preemption_from_a_group_that_died_does_not_crash_the_tick(queue, factory, spec) -> None:
    controller = make_controller(queue, factory, max_groups=1, max_adapters_per_group=1)
    (low,) = controller.submit([spec("low", steps=5, priority=0)])
    controller.tick()
    factory.groups[0].dead = True
    (high,) = controller.submit([spec("high", steps=2, priority=5)])

    controller.tick()  # preempting low from the dead group raises GroupFailedError

    assert queue.get(low).state == QUEUED
    run_to_end(controller)
    assert (queue.get(high).state, queue.get(low).state) == (SUCCEEDED, SUCCEEDED)


def test_cancel_in_a_group_that_died_does_not_crash_the_tick(queue, factory, spec) -> None:
    controller = make_controller(queue, factory)
    a, b = controller.submit([spec("a", steps=3), spec("b", steps=3)])
    controller.tick()
    factory.groups[0].dead = True
    queue.request_cancel(a)

    controller.tick()

    assert queue.get(a).state == CANCELLED
    assert queue.get(b).state in (QUEUED, RUNNING)  # requeued, maybe already re-admitted
    run_to_end(controller)
    assert queue.get(b).state == SUCCEEDED


def test_eval_losses_are_recorded_and_logged(queue, factory, spec) -> None:
    controller = make_controller(queue, factory)
    evaluated, plain = controller.submit([spec("ev", steps=5, eval_steps=2), spec("plain")])
    run_to_end(controller)
    record = queue.get(evaluated)
    assert record.state == SUCCEEDED
    assert (
        record.metrics["eval_loss"] == pytest.approx(2.0 / 5) and record.metrics["eval_step"] == 5
    )
    lines = [line for line in queue.logs(evaluated) if "eval_loss" in line]
    assert [line.split("step ")[1].split()[0] for line in lines] == ["2/5", "4/5", "5/5"]
    assert "eval_loss" not in queue.get(plain).metrics
    assert not any("eval_loss" in line for line in queue.logs(plain))


def test_learning_rate_grad_norm_and_tokens_seen_reach_the_status_and_the_log(
    queue, factory, spec
) -> None:
    controller = make_controller(queue, factory)
    (a,) = controller.submit([spec("a", steps=12)])
    for _ in range(10):
        controller.tick()

    record = queue.get(a)
    assert record.metrics == {"learning_rate": 1e-4, "grad_norm": 10.5, "tokens_seen": 640}
    progress = [line for line in queue.logs(a) if " loss " in line]
    assert len(progress) == 1  # every 10 steps
    assert progress[0].endswith("step 10/12 loss 0.1000 lr 0.0001 grad_norm 10.5000 1,000 tokens/s")
    run_to_end(controller)
    assert queue.get(a).metrics["tokens_seen"] == 64 * 12


def test_what_admission_reports_goes_into_the_jobs_log(queue, factory, spec) -> None:
    factory.notices["long-rows"] = ("dataset: 3 of 40 rows truncated to max_seq_length=32",)
    controller = make_controller(queue, factory)
    noted, plain = controller.submit([spec("long-rows"), spec("short-rows")])
    run_to_end(controller)
    lines = queue.logs(noted)
    started = next(i for i, line in enumerate(lines) if "started in group" in line)
    assert "3 of 40 rows truncated" in lines[started + 1]
    assert not any("truncated" in line for line in queue.logs(plain))


# -- planning only when something changed -----------------------------------------------


@pytest.fixture
def plans(monkeypatch) -> list[int]:
    """How many queued jobs each call of the scheduler was given, call by call."""
    calls: list[int] = []

    def counting(queued, *args, **kwargs):
        calls.append(len(queued))
        return schedule(queued, *args, **kwargs)

    monkeypatch.setattr(controller_module, "schedule", counting)
    return calls


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The id of every job record decoded from the queue file."""
    ids: list[str] = []
    from_row = JobRecord.from_row
    monkeypatch.setattr(JobRecord, "from_row", lambda row: ids.append(row["id"]) or from_row(row))
    return ids


def full_slot(queue, factory, spec, waiting: int) -> tuple[Controller, str, list[str]]:
    """One long job in the only slot, and `waiting` jobs of lower priority that cannot join it."""
    controller = make_controller(queue, factory, max_groups=1, max_adapters_per_group=1)
    (runner,) = controller.submit([spec("runner", steps=100, priority=1)])
    waiters = controller.submit([spec(f"w{i}", steps=2) for i in range(waiting)])
    controller.tick()
    controller.tick()
    assert queue.get(runner).state == RUNNING
    return controller, runner, waiters


def test_a_tick_with_nothing_changed_neither_plans_nor_reads_waiting_jobs(
    queue, factory, spec, plans, decoded
) -> None:
    controller, runner, waiters = full_slot(queue, factory, spec, waiting=5)
    plans.clear()
    decoded.clear()

    for _ in range(3):
        assert controller.tick() is True

    assert plans == []
    assert set(decoded) == {runner}  # only the running job, whose progress is recorded
    assert queue.get(runner).step == 5
    assert all(queue.get(w).state == QUEUED for w in waiters)


def test_a_job_submitted_through_another_connection_is_planned_on_the_next_tick(
    tmp_path, factory, spec, plans
) -> None:
    path = tmp_path / "queue.sqlite"
    with JobQueue(path) as queue, JobQueue(path) as cli:  # cli: `carpool submit` elsewhere
        controller = make_controller(queue, factory)
        controller.tick()
        controller.tick()
        assert plans == [0]  # nothing queued: planned once, then nothing changed

        s = spec("a", steps=2)
        (a,) = cli.submit([(s.name, s.model_dump(mode="json"), s.base_model, s.priority)])
        controller.tick()

        assert plans == [0, 1]
        assert queue.get(a).state == RUNNING


def test_a_cancel_from_another_connection_replans_and_frees_the_slot(
    tmp_path, factory, spec, plans
) -> None:
    path = tmp_path / "queue.sqlite"
    with JobQueue(path) as queue, JobQueue(path) as cli:
        controller, runner, (waiter,) = full_slot(queue, factory, spec, waiting=1)
        plans.clear()
        controller.tick()
        assert plans == []

        cli.request_cancel(runner)
        controller.tick()  # the runner leaves; the waiter takes its place before the round

        assert plans == [1]
        assert (queue.get(runner).state, queue.get(waiter).state) == (CANCELLED, RUNNING)
        assert queue.get(waiter).step == 1


def test_a_finish_replans_and_a_waiting_job_takes_the_slot(queue, factory, spec, plans) -> None:
    controller = make_controller(queue, factory, max_groups=1, max_adapters_per_group=1)
    first, second = controller.submit([spec("first", steps=3), spec("second", steps=2)])
    controller.tick()
    controller.tick()
    assert plans == [2, 1]  # the second tick saw the first one's own admission
    controller.tick()  # `first` finishes in this round
    assert queue.get(first).state == SUCCEEDED
    assert plans == [2, 1]

    controller.tick()

    assert plans == [2, 1, 1]
    assert queue.get(second).state == RUNNING


def test_a_group_that_cannot_start_is_tried_again_with_nothing_else_changed(
    queue, spec, plans
) -> None:
    factory = FakeGroupFactory()
    refusals = [GroupFailedError("no room for its ranks")]

    def refusing_once(
        group_id: str, base_model: str, quantization: QuantizationSpec | None
    ) -> FakeGroup:
        if refusals:
            raise refusals.pop()
        return factory(group_id, base_model, quantization)

    controller = make_controller(queue, refusing_once)
    (a,) = controller.submit([spec("a", steps=2)])
    assert controller.tick() is False
    assert queue.get(a).state == QUEUED

    assert controller.tick() is True
    assert plans == [1, 1]
    assert queue.get(a).state == RUNNING


def test_a_job_submitted_during_a_round_is_parsed_before_the_round_ends(
    tmp_path, factory, spec, monkeypatch
) -> None:
    path = tmp_path / "queue.sqlite"
    with JobQueue(path) as queue, JobQueue(path) as cli:
        controller = make_controller(queue, factory)
        (a,) = controller.submit([spec("a", steps=5)])
        controller.tick()
        (group,) = factory.groups
        late = spec("late", steps=2)
        start_round = group.start_round

        def start_round_then_submit() -> None:  # once: `carpool submit` while a round runs
            start_round()
            monkeypatch.setattr(group, "start_round", start_round)
            cli.submit([(late.name, late.model_dump(mode="json"), late.base_model, 0)])

        monkeypatch.setattr(group, "start_round", start_round_then_submit)
        parsed_after: list[str] = []  # the last group call before each spec is parsed
        compute_demand = controller._compute_demand
        monkeypatch.setattr(
            controller,
            "_compute_demand",
            lambda record: parsed_after.append(factory.events[-1].call) or compute_demand(record),
        )

        controller.tick()
        assert parsed_after == ["start_round"]  # while the group computes, not between rounds
        (b,) = [r.id for r in queue.list() if r.name == "late"]
        assert queue.get(b).state == QUEUED

        controller.tick()
        assert queue.get(b).state == RUNNING
        assert parsed_after == ["start_round"]  # parsed once


def test_a_plan_that_raised_is_made_again_on_the_next_tick(
    queue, factory, spec, monkeypatch
) -> None:
    controller = make_controller(queue, factory, max_groups=0)
    controller.submit([spec("a", steps=2)])
    controller.tick()  # no slot: the plan decides nothing
    calls: list[int] = []

    def failing_once(queued, *args):
        calls.append(len(queued))
        if len(calls) == 1:
            raise RuntimeError("bug")
        return schedule(queued, *args)

    monkeypatch.setattr(controller_module, "schedule", failing_once)
    controller.submit([spec("b", steps=2)])
    with pytest.raises(RuntimeError, match="bug"):
        controller.tick()

    controller.tick()  # nothing new since the failed plan, which still has to be made

    assert calls == [2, 2]
