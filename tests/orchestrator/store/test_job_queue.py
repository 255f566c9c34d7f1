"""The durable job queue: transitions, atomicity, durability and concurrent writers."""

from __future__ import annotations

import multiprocessing
import pickle
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from carpool.orchestrator.store.job_ids import validate_job_id
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import (
    FINAL_STATES,
    InvalidTransitionError,
    JobState,
    UnknownJobError,
)
from carpool.orchestrator.store.queue_schema import SCHEMA_VERSION

Q, R, S, F, C = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)


@pytest.fixture
def queue(tmp_path: Path):
    q = JobQueue(tmp_path / "state" / "queue.db")  # parent dir does not exist yet
    yield q
    q.close()


def one(queue: JobQueue, name: str = "job", priority: int = 0) -> str:
    return queue.submit([(name, {"lr": 1e-4, "name": name}, "tiny", priority)])[0]


def job_in(queue: JobQueue, state: JobState) -> str:
    """A job driven through legal transitions into `state`."""
    job_id = one(queue)
    if state == Q:
        return job_id
    if state == C:
        queue.request_cancel(job_id)
        return job_id
    queue.mark_running(job_id, "g0")
    if state in (S, F):
        queue.finish(job_id, state)
    if state == JobState.PRUNED:
        queue.prune(job_id, "file:///adapters/x")
    return job_id


def test_submit_get_list_round_trip_and_order(queue: JobQueue) -> None:
    ids = queue.submit(
        [
            ("low", {"a": 1}, "base-a", 0),
            ("high", {"b": [1, 2]}, "base-b", 5),
            ("low2", {}, "base-a", 0),
            ("high2", {}, "base-a", 5),
        ]
    )
    assert [i.rsplit("-", 1)[0] for i in ids] == ["low", "high", "low2", "high2"]
    assert all(re.fullmatch(r"[a-z0-9]+-[0-9a-f]{8}", i) for i in ids)
    job = queue.get(ids[1])
    assert (job.id, job.name, job.spec, job.base_model, job.priority) == (
        ids[1],
        "high",
        {"b": [1, 2]},
        "base-b",
        5,
    )
    assert job.state == Q and job.attempts == 0 and job.group is None
    assert job.checkpoint is None and job.step == 0 and job.metrics == {}
    assert not job.cancel_requested and job.submitted_at == job.updated_at
    # priority first, then first-come
    assert [j.name for j in queue.list()] == ["high", "high2", "low", "low2"]
    assert [j.name for j in queue.queued()] == ["high", "high2", "low", "low2"]
    assert [queue.get(i).seq for i in ids] == sorted(queue.get(i).seq for i in ids)
    queue.mark_running(ids[1], "g")
    assert [j.name for j in queue.list([R])] == ["high"]
    assert [j.name for j in queue.queued()] == ["high2", "low", "low2"]
    assert queue.counts() == {Q: 3, R: 1, S: 0, F: 0, C: 0, JobState.PRUNED: 0}


def test_submit_is_all_or_nothing(queue: JobQueue) -> None:
    keep = one(queue, "before")
    with pytest.raises(TypeError):
        queue.submit([("ok", {}, "m", 0), ("bad", {"x": object()}, "m", 0)])
    with pytest.raises(ValueError, match="invalid job id"):
        queue.submit([("ok", {}, "m", 0), ("Bad/Name", {}, "m", 0)])
    with pytest.raises(ValueError):  # NaN is not JSON
        queue.submit([("ok", {}, "m", 0), ("nan", {"x": float("nan")}, "m", 0)])
    assert [j.id for j in queue.list()] == [keep]
    assert queue.submit([]) == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "X", "Upper", "-a", "a b", "a" * 100, None])
def test_validate_job_id_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid job id"):
        validate_job_id(bad)  # type: ignore[arg-type]


def test_validate_job_id_accepts() -> None:
    for good in ["a", "0", "support-bot_2-1a2b3c4d", "a" * 81]:
        assert validate_job_id(good) == good


def test_legal_transitions(queue: JobQueue) -> None:
    job_id = one(queue)
    job = queue.mark_running(job_id, "g1")
    assert (job.state, job.group, job.attempts) == (R, "g1", 1)
    job = queue.requeue(job_id, "preempted")
    assert (job.state, job.group) == (Q, None)
    job = queue.mark_running(job_id, "g2")
    assert (job.state, job.group, job.attempts) == (R, "g2", 2)
    job = queue.finish(job_id, F, error="oom")
    assert (job.state, job.error, job.group) == (F, "oom", None)

    for final in FINAL_STATES:
        job_id = one(queue)
        queue.mark_running(job_id, "g")
        assert queue.finish(job_id, final).state == final
    for final in (F, C):
        assert queue.finish(one(queue), final).state == final


def test_mark_running_clears_previous_error(queue: JobQueue) -> None:
    job_id = one(queue)
    with queue._tx() as db:  # an error left by an earlier attempt
        db.execute("UPDATE jobs SET error = 'old' WHERE id = ?", (job_id,))
    assert queue.mark_running(job_id, "g").error is None


@pytest.mark.parametrize("state", [Q, R, S, F, C])
def test_illegal_transitions_raise(queue: JobQueue, state: JobState) -> None:
    attempts = {
        "mark_running": lambda j: queue.mark_running(j, "g"),
        "requeue": lambda j: queue.requeue(j, "x"),
        "record_progress": lambda j: queue.record_progress(
            j, step=1, total_steps=2, loss=1.0, tokens_per_second=1.0
        ),
        "record_checkpoint": lambda j: queue.record_checkpoint(j, "/ck", 1),
        **{f"finish_{s.value}": (lambda j, s=s: queue.finish(j, s)) for s in JobState},
    }
    legal = {
        Q: {"mark_running", "record_checkpoint", "finish_failed", "finish_cancelled"},
        R: {"requeue", "record_progress", "record_checkpoint"}
        | {f"finish_{s.value}" for s in FINAL_STATES},
    }.get(state, set())
    for name, attempt in attempts.items():
        job_id = job_in(queue, state)
        before = queue.get(job_id)
        if name in legal:
            attempt(job_id)
            continue
        with pytest.raises(InvalidTransitionError) as info:
            attempt(job_id)
        message = str(info.value)
        assert job_id in message and state.value in message, (name, message)
        after = queue.get(job_id)
        assert after == before, name  # nothing changed, not even updated_at


def test_errors_name_the_job_and_pickle() -> None:
    err = InvalidTransitionError("j-1", R, "requeue")
    assert str(err) == "job 'j-1' is running: cannot requeue"
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.job_id, back.state, back.transition, str(back)) == ("j-1", R, "requeue", str(err))
    unknown = UnknownJobError("x")
    assert str(unknown) == "unknown job id 'x'" and isinstance(unknown, KeyError)
    assert str(pickle.loads(pickle.dumps(unknown))) == "unknown job id 'x'"


def test_unknown_ids(queue: JobQueue) -> None:
    for call in (
        lambda: queue.get("nope"),
        lambda: queue.mark_running("nope", "g"),
        lambda: queue.request_cancel("nope"),
        lambda: queue.append_log("nope", "x"),
        lambda: queue.logs("nope"),
    ):
        with pytest.raises(UnknownJobError, match="unknown job id 'nope'"):
            call()


def test_cancel_semantics(queue: JobQueue) -> None:
    queued = one(queue)
    assert queue.request_cancel(queued).state == C

    running = one(queue)
    queue.mark_running(running, "g")
    job = queue.request_cancel(running)
    assert (job.state, job.cancel_requested) == (R, True)
    assert queue.request_cancel(running).cancel_requested  # idempotent
    assert queue.finish(running, C).state == C  # the controller, at a step boundary

    for state in FINAL_STATES:
        job_id = job_in(queue, state)
        before = queue.get(job_id)
        assert queue.request_cancel(job_id) == before


def test_pending_cancel_wins_over_requeue(queue: JobQueue) -> None:
    job_id = one(queue)
    queue.mark_running(job_id, "g")
    queue.request_cancel(job_id)
    assert queue.requeue(job_id, "preempted").state == C


def test_progress_checkpoint_and_requeue(queue: JobQueue) -> None:
    job_id = one(queue)
    queue.mark_running(job_id, "g")
    queue.record_progress(
        job_id,
        step=3,
        total_steps=10,
        loss=2.5,
        tokens_per_second=100.0,
        metrics={"tokens_seen": 9},
    )
    queue.record_checkpoint(job_id, "/ckpt/job/step-4", 4)
    queue.record_progress(
        job_id, step=6, total_steps=10, loss=2.0, tokens_per_second=120.0, metrics={"rows": 1}
    )
    job = queue.get(job_id)
    assert (job.step, job.total_steps, job.loss, job.tokens_per_second) == (6, 10, 2.0, 120.0)
    assert job.metrics == {"tokens_seen": 9, "rows": 1}  # merged, not replaced

    job = queue.requeue(job_id, "group g lost")
    assert (job.state, job.group) == (Q, None)
    assert (job.checkpoint, job.checkpoint_step, job.step) == ("/ckpt/job/step-4", 4, 4)
    # A lost group is a requeue, not a preemption.
    assert job.metrics == {"tokens_seen": 9, "rows": 1, "requeues": 1}
    assert queue.logs(job_id)[-1].endswith("requeued: group g lost")

    queue.mark_running(job_id, "g2")
    job = queue.requeue(job_id, "preempted by priority", preempted=True)
    assert (job.metrics["preemptions"], job.metrics["requeues"]) == (1, 2)
    queue.mark_running(job_id, "g3")
    job = queue.requeue(job_id, "preempted again", preempted=True)
    assert (job.metrics["preemptions"], job.metrics["requeues"]) == (2, 3)


def test_final_step_checkpoint_and_success_are_one_transaction(queue: JobQueue) -> None:
    job_id = job_in(queue, R)
    queue.record_checkpoint(job_id, "/ck/step-2", 2)
    with queue._tx() as db:  # fault injection: marking the job succeeded aborts
        db.execute(
            "CREATE TRIGGER crash BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'succeeded'"
            " BEGIN SELECT RAISE(ABORT, 'crash'); END"
        )
    before = queue.get(job_id)
    final = dict(step=4, total_steps=4, loss=1.0, tokens_per_second=1.0, checkpoint="/ck/step-4")
    with pytest.raises(sqlite3.IntegrityError, match="crash"):
        queue.record_progress(job_id, **final, adapter="/adapters/job")
    assert queue.get(job_id) == before  # not even the progress or the checkpoint

    with queue._tx() as db:
        db.execute("DROP TRIGGER crash")
    queue.record_progress(job_id, **final, adapter="/adapters/job")
    job = queue.get(job_id)
    assert (job.state, job.group, job.step) == (S, None, 4)
    assert (job.checkpoint, job.checkpoint_step) == ("/ck/step-4", 4)
    assert queue.logs(job_id)[-1].endswith("succeeded: adapter at /adapters/job")


def test_diverged_progress_is_recorded(queue: JobQueue) -> None:
    job_id = job_in(queue, R)
    nan = float("nan")
    queue.record_progress(
        job_id, step=1, total_steps=2, loss=nan, tokens_per_second=1.0, metrics={"g": nan}
    )
    job = queue.get(job_id)
    assert job.step == 1 and job.metrics["g"] != job.metrics["g"]  # still NaN
    assert job.loss is None  # SQLite has no NaN REAL: it stores NULL


def test_recover_running(queue: JobQueue) -> None:
    a, b, c, d = (one(queue, n) for n in "abcd")
    for job_id in (a, b, d):
        queue.mark_running(job_id, "g")
    queue.record_checkpoint(a, "/ck/a", 7)
    queue.finish(b, S)
    queue.request_cancel(d)

    recovered = queue.recover_running()
    assert [(j.id, j.state) for j in recovered] == [(a, Q), (d, C)]
    assert queue.get(a).checkpoint == "/ck/a" and queue.get(a).group is None
    assert queue.logs(a)[-1].endswith("requeued after controller restart")
    assert queue.get(b).state == S and queue.get(c).state == Q
    assert queue.list([R]) == [] and queue.recover_running() == []


def test_logs_order_prefix_and_since(queue: JobQueue) -> None:
    job_id, other = one(queue), one(queue, "other")
    for i in range(5):
        queue.append_log(job_id, f"line {i}")
        queue.append_log(other, f"other {i}")
    lines = queue.logs(job_id)
    assert [line[20:] for line in lines] == [f"line {i}" for i in range(5)]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d line \d$", line) for line in lines)
    assert queue.logs(job_id, since=3) == lines[3:]
    assert queue.logs(job_id, since=99) == []


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with JobQueue(path) as q:
        a, b = q.submit([("a", {"x": 1}, "m", 1), ("b", {"y": 2}, "m", 0)])
        q.mark_running(a, "g")
        q.record_checkpoint(a, "/ck", 2)
        q.append_log(b, "hello")
        before = q.list()
    with JobQueue(path) as q:
        assert q.list() == before
        assert q.logs(b)[-1].endswith("hello")
        assert q.submit([("c", {}, "m", 0)])  # and still writable
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    db.close()


def test_concurrent_threads(queue: JobQueue) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(25):
                ids.extend(queue.submit([(f"t{t}-{i}", {"t": t, "i": i}, "m", t % 3)]))
                queue.counts()
        except BaseException as e:  # surface it in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == len(set(ids)) == 200
    assert sorted(j.id for j in queue.queued()) == sorted(ids)


def _submit_from_process(path: str, p: int, go: object) -> None:
    """Two threads of 25 submits each, sharing this process's JobQueue."""
    go.wait()  # type: ignore[attr-defined]  # all four open the fresh file at once
    with JobQueue(path) as q:

        def submit(t: int) -> None:
            for i in range(25):
                q.submit([(f"p{p}-{t}-{i}", {"p": p, "i": i}, "m", 0)])

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def test_concurrent_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "queue.db")  # not there yet: schema creation races too
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_submit_from_process, args=(path, p, go)) for p in range(4)]
    for proc in procs:
        proc.start()
    go.set()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 4
    with JobQueue(path) as q:
        jobs = q.queued()
        assert q.counts()[Q] == 200
    assert len({j.id for j in jobs}) == 200
    names = sorted(f"p{p}-{t}-{i}" for p in range(4) for t in range(2) for i in range(25))
    assert sorted(j.name for j in jobs) == names


def _open_and_submit(path: str, go: object) -> None:
    go.wait()  # type: ignore[attr-defined]
    with JobQueue(path) as q:
        q.submit([("x", {"a": 1}, "m", 0)])


def test_fresh_file_opened_by_many_processes_at_once(tmp_path: Path) -> None:
    """Converting a new file to WAL races between openers; none may fail."""
    ctx = multiprocessing.get_context("fork")  # cheap enough for many rounds
    exit_codes: list[int | None] = []
    for trial in range(20):
        path = str(tmp_path / f"q{trial}.db")
        go = ctx.Event()
        procs = [ctx.Process(target=_open_and_submit, args=(path, go)) for _ in range(6)]
        for proc in procs:
            proc.start()
        go.set()
        for proc in procs:
            proc.join(timeout=60)
        exit_codes += [proc.exitcode for proc in procs]
        with JobQueue(path) as q:
            assert len(q.queued()) == 6
    assert exit_codes == [0] * len(exit_codes)


# -- reading only what changed -------------------------------------------------------------


def test_changed_since_returns_each_state_change_once_in_commit_order(queue: JobQueue) -> None:
    a, b = queue.submit([("a", {}, "m", 0), ("b", {}, "m", 0)])
    first = queue.changed_since(0)
    assert [(r.id, r.state) for r in first] == [(a, Q), (b, Q)]
    seen = first[-1].state_seq

    queue.mark_running(a, "g0")
    queue.record_progress(a, step=1, total_steps=3, loss=1.0, tokens_per_second=1.0)
    queue.record_checkpoint(a, "/ck", 1)
    queue.append_log(b, "a line")
    changed = queue.changed_since(seen)
    # Progress, checkpoints and logs are no change of state: only the start is read.
    assert [(r.id, r.state, r.step) for r in changed] == [(a, R, 1)]
    seen = changed[-1].state_seq

    queue.request_cancel(a)  # running: flagged only, but the controller must see the flag
    queue.request_cancel(b)
    changed = queue.changed_since(seen)
    assert [(r.id, r.state, r.cancel_requested) for r in changed] == [(a, R, True), (b, C, False)]
    assert queue.changed_since(changed[-1].state_seq) == []


def test_changed_since_sees_writes_of_another_connection_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with JobQueue(path) as reader, JobQueue(path) as writer:
        (a,) = reader.submit([("a", {}, "m", 0)])
        seen = reader.changed_since(0)[-1].state_seq
        (b,) = writer.submit([("b", {}, "m", 0)])
        writer.request_cancel(a)
        assert [(r.id, r.state) for r in reader.changed_since(seen)] == [(b, Q), (a, C)]


# The schema of carpool's first queue files (user_version 1), as they were made.
_SCHEMA_1 = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    spec TEXT NOT NULL, base_model TEXT NOT NULL, priority INTEGER NOT NULL, state TEXT NOT NULL,
    submitted_at REAL NOT NULL, updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    group_id TEXT, checkpoint TEXT, checkpoint_step INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, loss REAL, tokens_per_second REAL,
    metrics TEXT NOT NULL DEFAULT '{}', error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_state ON jobs (state, priority DESC, seq);
CREATE TABLE logs (
    n INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL, line TEXT NOT NULL
);
CREATE INDEX logs_by_job ON logs (job_id, n);
PRAGMA user_version = 1;
"""


def test_a_queue_file_of_schema_1_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_1)
    for name, state in [("a", "queued"), ("b", "running"), ("c", "succeeded")]:
        db.execute(
            "INSERT INTO jobs (id, name, spec, base_model, priority, state, submitted_at,"
            " updated_at, group_id) VALUES (?, ?, '{\"x\": 1}', 'm', 0, ?, 1.0, 1.0, ?)",
            (f"{name}-1", name, state, "g0" if state == "running" else None),
        )
    db.execute("INSERT INTO logs (job_id, time, line) VALUES ('a-1', 1.0, 'queued')")
    db.commit()
    db.close()

    with JobQueue(path) as q:
        assert [(r.id, r.state, r.spec) for r in q.list()] == [
            ("a-1", Q, {"x": 1}),
            ("b-1", R, {"x": 1}),
            ("c-1", S, {"x": 1}),
        ]
        assert q.logs("a-1")[0].endswith("queued")
        # Every old job is read once by a reader starting from scratch, and changes after
        # the migration come after them.
        old = q.changed_since(0)
        assert [r.id for r in old] == ["a-1", "b-1", "c-1"]
        q.request_cancel("a-1")
        (d,) = q.submit([("d", {}, "m", 0)])
        changed = q.changed_since(old[-1].state_seq)
        assert [(r.id, r.state) for r in changed] == [("a-1", C), (d, Q)]
    with JobQueue(path) as q:  # reopening a migrated file changes nothing
        assert [r.id for r in q.changed_since(0)] == ["b-1", "c-1", "a-1", d]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def _entries(*steps: int) -> list[dict]:
    return [{"loss": 1.0 / s, "step": s, "epoch": s / 10} for s in steps]


def test_history_is_appended_with_progress_and_read_incrementally(queue: JobQueue) -> None:
    job_id, other = one(queue), one(queue, "other")
    for j in (job_id, other):
        queue.mark_running(j, "g")
    assert queue.history(job_id) == []
    progress = dict(total_steps=20, loss=1.0, tokens_per_second=1.0)
    queue.record_progress(job_id, step=10, **progress, history=_entries(10))
    queue.record_progress(other, step=10, **progress, history=_entries(10))
    evaluated = [*_entries(20), {"eval_loss": 0.5, "step": 20, "epoch": 2.0}]
    queue.record_progress(job_id, step=20, **progress, history=evaluated, adapter="/a")

    assert queue.history(job_id) == _entries(10) + evaluated
    assert queue.history(job_id, since=1) == evaluated  # only what came after the first entry
    assert queue.history(job_id, since=3) == []
    with pytest.raises(UnknownJobError):
        queue.history("nope-1")


def test_history_of_steps_redone_after_a_requeue_is_kept_once(queue: JobQueue) -> None:
    job_id = job_in(queue, R)
    progress = dict(total_steps=40, loss=1.0, tokens_per_second=1.0)
    queue.record_progress(job_id, step=10, **progress, history=_entries(10), checkpoint="/c")
    queue.record_progress(job_id, step=20, **progress, history=_entries(20))
    queue.requeue(job_id, "group lost")  # resumes at step 10: step 20 is trained again
    queue.mark_running(job_id, "g2")
    queue.record_progress(job_id, step=20, **progress, history=_entries(20))
    queue.record_progress(job_id, step=30, **progress, history=_entries(30))
    assert [e["step"] for e in queue.history(job_id)] == [10, 20, 30]


_MIGRATION_2 = """
ALTER TABLE jobs ADD COLUMN state_seq INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET state_seq = seq;
CREATE INDEX jobs_by_state_seq ON jobs (state_seq);
PRAGMA user_version = 2;
"""


def test_a_queue_file_of_schema_2_gains_an_empty_history_in_place(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_1 + _MIGRATION_2)
    db.execute(
        "INSERT INTO jobs (id, name, spec, base_model, priority, state, submitted_at,"
        " updated_at, state_seq) VALUES ('a-1', 'a', '{}', 'm', 0, 'running', 1.0, 1.0, 1)"
    )
    db.commit()
    db.close()

    with JobQueue(path) as q:
        assert q.get("a-1").state == R and q.history("a-1") == []
        q.record_progress(
            "a-1", step=10, total_steps=20, loss=1.0, tokens_per_second=1.0, history=_entries(10)
        )
    with JobQueue(path) as q:  # reopening a migrated file changes nothing
        assert q.history("a-1") == _entries(10)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_queue_file_of_schema_3_gains_sweeps_in_place(tmp_path: Path) -> None:
    """A state directory from before sweeps keeps its jobs and can run a sweep."""
    path = tmp_path / "queue.db"
    with JobQueue(path) as q:
        job_id = one(q, "old")
    db = sqlite3.connect(path)  # back to schema 3, as a carpool of that time left it
    db.executescript("DROP TABLE sweep_trials; DROP TABLE sweeps; PRAGMA user_version = 3;")
    db.close()
    with JobQueue(path) as q:
        assert q.get(job_id).name == "old" and q.sweeps() == []
        q.create_sweep("s", {"name": "s"}, {"name": "t"}, "/sweep.yaml")
        trial = q.submit_trial("s", 0, {"adapter.r": 4}, ("s-t00", {}, "m", 0))
        (record,) = q.trials("s")
        assert (record.number, record.params, record.job.id) == (0, {"adapter.r": 4}, trial)
        q.mark_running(trial, "g")
        assert q.prune(trial, "mem://adapters/x").state == JobState.PRUNED
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
