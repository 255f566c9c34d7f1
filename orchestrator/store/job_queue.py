"""The durable job queue: one SQLite file (WAL) in the operator's state directory.

Every state change is one `BEGIN IMMEDIATE` transaction, so the controller, the
CLI and tests may open the same file from several processes and threads, and a
crash never leaves a job half-moved. Standard library only: the queue must work
(and be tested) without Ray or torch.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from carpool.orchestrator.store.job_ids import new_job_id
from carpool.orchestrator.store.job_records import (
    InvalidTransitionError,
    JobRecord,
    JobState,
    SweepExistsError,
    SweepRecord,
    TrialRecord,
    UnknownJobError,
    UnknownSweepError,
)
from carpool.orchestrator.store.queue_schema import migrate


def _spec_json(spec: dict) -> str:
    return json.dumps(spec, allow_nan=False)  # NaN is not JSON; other readers would choke


def _real(value: float | None) -> float | None:
    return None if value is None else float(value)


class JobQueue:
    """Jobs and their logs in one SQLite file; safe across threads and processes."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write
        # lock is taken up front and a concurrent writer waits (busy_timeout)
        # instead of failing mid-transaction on a lock upgrade.
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()  # one connection, many threads
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._enable_wal(busy_timeout_s)
        self._conn.execute("PRAGMA synchronous=NORMAL")  # durable at WAL checkpoints; fast commits
        with self._tx() as db:
            migrate(db, self.path)

    def _enable_wal(self, timeout_s: float) -> None:
        # Switching a fresh file to WAL needs an exclusive lock, and SQLite
        # answers SQLITE_BUSY at once (without its busy handler) while another
        # process is opening or converting the same file; so we wait ourselves.
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also when COMMIT itself failed
                    self._conn.execute("ROLLBACK")
                raise

    # --- reads ---

    @staticmethod
    def _fetch(db: sqlite3.Connection, job_id: str) -> JobRecord:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(job_id)
        return JobRecord.from_row(row)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._fetch(self._conn, job_id)

    def list(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs", []
        if states is not None:
            args = [JobState(s).value for s in states]
            sql += f" WHERE state IN ({','.join('?' * len(args))})"
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY priority DESC, seq ASC", args).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def changed_since(self, state_seq: int) -> list[JobRecord]:
        """Jobs whose state or cancel request changed after `state_seq`, oldest change first.

        Writers are serialized and each change gets a number above every committed
        one, so a reader that passes the last record's `state_seq` next time sees
        every later change once, whichever process made it.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE state_seq > ? ORDER BY state_seq", (state_seq,)
            ).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def queued(self) -> list[JobRecord]:
        return self.list([JobState.QUEUED])

    def counts(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): n for state, n in rows})
        return counts

    def logs(self, job_id: str, since: int = 0) -> list[str]:
        """Lines in order; `since` skips that many, so a poller passes how many it has."""
        with self._lock:
            self._fetch(self._conn, job_id)
            rows = self._conn.execute(
                "SELECT time, line FROM logs WHERE job_id = ? ORDER BY n LIMIT -1 OFFSET ?",
                (job_id, max(since, 0)),
            ).fetchall()
        # Local time, like `date`: operators read these next to their own clocks.
        return [time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(t)) + line for t, line in rows]

    def history(self, job_id: str, since: int = 0) -> list[dict]:
        """The job's history entries in the order kept; `since` skips that many, so a
        poller passes how many it has (entries are only ever appended)."""
        with self._lock:
            self._fetch(self._conn, job_id)
            rows = self._conn.execute(
                "SELECT entry FROM history WHERE job_id = ? ORDER BY n LIMIT -1 OFFSET ?",
                (job_id, max(since, 0)),
            ).fetchall()
        return [json.loads(entry) for (entry,) in rows]

    # --- writes ---

    def submit(self, jobs: Sequence[tuple[str, dict, str, int]]) -> list[str]:
        """Queue (name, spec, base_model, priority) tuples: all of them or, on any error, none."""
        ids: list[str] = []
        with self._tx() as db:
            state_seq = self._next_state_seq(db)
            for name, spec, base_model, priority in jobs:
                job_id = new_job_id(name)
                now = time.time()
                db.execute(
                    "INSERT INTO jobs (id, name, spec, base_model, priority, state,"
                    " submitted_at, updated_at, state_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, name, _spec_json(spec), base_model, int(priority), "queued", now, now,
                     state_seq),
                )  # fmt: skip
                ids.append(job_id)
        return ids

    @contextmanager
    def _guard(
        self, job_id: str, transition: str, allowed: Iterable[JobState]
    ) -> Iterator[tuple[sqlite3.Connection, JobRecord]]:
        """A write transaction on one job that is in `allowed`, else InvalidTransitionError."""
        with self._tx() as db:
            job = self._fetch(db, job_id)
            if job.state not in frozenset(allowed):
                raise InvalidTransitionError(job_id, job.state, transition)
            yield db, job

    def _set(
        self, db: sqlite3.Connection, job_id: str, log: str | None, **columns: Any
    ) -> JobRecord:
        columns["updated_at"] = time.time()
        if "state" in columns or "cancel_requested" in columns:
            columns["state_seq"] = self._next_state_seq(db)
        assigns = ", ".join(f"{key} = ?" for key in columns)  # keys are ours, never user input
        db.execute(f"UPDATE jobs SET {assigns} WHERE id = ?", (*columns.values(), job_id))
        if log is not None:
            self._log(db, job_id, log)
        return self._fetch(db, job_id)

    def mark_running(self, job_id: str, group: str) -> JobRecord:
        with self._guard(job_id, "start running", [JobState.QUEUED]) as (db, job):
            running = JobState.RUNNING.value
            attempts = job.attempts + 1  # so the controller can give up after max_attempts
            return self._set(
                db, job_id, None, state=running, group_id=group, attempts=attempts, error=None
            )

    def record_progress(
        self,
        job_id: str,
        *,
        step: int,
        total_steps: int,
        loss: float | None,
        tokens_per_second: float | None,
        metrics: dict | None = None,
        checkpoint: str | None = None,
        adapter: str | None = None,
        history: Sequence[dict] = (),
    ) -> None:
        """A running job's step: its progress, its new `history` entries, the checkpoint
        taken after it and, with `adapter` (its exported adapter), its success.

        One transaction: a crash never leaves a job whose final checkpoint is
        recorded still running, to be resumed from a checkpoint with nothing to do.
        """
        with self._guard(job_id, "record progress", [JobState.RUNNING]) as (db, job):
            columns: dict[str, Any] = {
                "step": int(step),
                "total_steps": int(total_steps),
                "loss": _real(loss),  # SQLite turns NaN into NULL
                "tokens_per_second": _real(tokens_per_second),
                "metrics": json.dumps({**job.metrics, **(metrics or {})}),  # a NaN must not crash
            }
            if checkpoint is not None:
                columns.update(checkpoint=str(checkpoint), checkpoint_step=int(step))
            line = None
            if adapter is not None:
                columns.update(state=JobState.SUCCEEDED.value, group_id=None, error=None)
                line = f"succeeded: adapter at {adapter}"
            self._append_history(db, job_id, history)
            self._set(db, job_id, line, **columns)

    def record_checkpoint(self, job_id: str, checkpoint: str, step: int) -> None:
        # Queued is allowed too: a preempted job's last save may land after its requeue.
        allowed = [JobState.RUNNING, JobState.QUEUED]
        with self._guard(job_id, "record a checkpoint", allowed) as (db, _):
            self._set(db, job_id, None, checkpoint=str(checkpoint), checkpoint_step=int(step))

    def _requeue(
        self, db: sqlite3.Connection, job: JobRecord, line: str, preempted: bool = False
    ) -> JobRecord:
        if job.cancel_requested:  # the user asked to stop it: never run it again
            return self._set(db, job.id, "cancelled", state=JobState.CANCELLED.value, group_id=None)
        counts = {"requeues": job.metrics.get("requeues", 0) + 1}
        if preempted:
            counts["preemptions"] = job.metrics.get("preemptions", 0) + 1
        return self._set(
            db,
            job.id,
            line,
            state=JobState.QUEUED.value,
            group_id=None,
            step=job.checkpoint_step,  # steps past the checkpoint are lost; it resumes there
            metrics=json.dumps({**job.metrics, **counts}),
        )

    def requeue(self, job_id: str, reason: str, *, preempted: bool = False) -> JobRecord:
        """running -> queued, to resume from its checkpoint (cancelled if a cancel is pending).

        Counted in the job's metrics: `requeues` always, `preemptions` when `preempted`
        (a higher-priority job took its place, rather than a failure or a shutdown).
        """
        with self._guard(job_id, "requeue", [JobState.RUNNING]) as (db, job):
            return self._requeue(db, job, f"requeued: {reason}", preempted)

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> JobRecord:
        state = JobState(state)
        # A queued job can be cancelled or fail (e.g. its data vanished), never succeed.
        allowed = {
            JobState.SUCCEEDED: [JobState.RUNNING],
            JobState.FAILED: [JobState.RUNNING, JobState.QUEUED],
            JobState.CANCELLED: [JobState.RUNNING, JobState.QUEUED],
            JobState.PRUNED: [JobState.RUNNING],
        }.get(state, [])
        with self._guard(job_id, f"finish as {state.value}", allowed) as (db, _):
            return self._set(db, job_id, None, state=state.value, group_id=None, error=error)

    def prune(self, job_id: str, adapter: str | None) -> JobRecord:
        """running -> pruned: its sweep stopped it early; its adapter (as it stood) is kept."""
        with self._guard(job_id, "prune", [JobState.RUNNING]) as (db, job):
            line = f"pruned at step {job.step}" + (f": adapter at {adapter}" if adapter else "")
            return self._set(db, job_id, line, state=JobState.PRUNED.value, group_id=None)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Queued: cancelled now. Running: flagged; the controller stops it between rounds."""
        with self._tx() as db:
            job = self._fetch(db, job_id)
            if job.state == JobState.QUEUED:
                return self._set(db, job_id, "cancelled", state=JobState.CANCELLED.value)
            if job.state == JobState.RUNNING and not job.cancel_requested:
                return self._set(db, job_id, "cancel requested", cancel_requested=1)
            return job

    @staticmethod
    def _next_state_seq(db: sqlite3.Connection) -> int:
        # Inside the write transaction: no other writer can take the same number.
        return db.execute("SELECT COALESCE(MAX(state_seq), 0) + 1 FROM jobs").fetchone()[0]

    @staticmethod
    def _append_history(db: sqlite3.Connection, job_id: str, entries: Sequence[dict]) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO history (job_id, step, kind, entry) VALUES (?, ?, ?, ?)",
            [
                (job_id, int(e["step"]), "eval" if "eval_loss" in e else "train", json.dumps(e))
                for e in entries
            ],
        )

    @staticmethod
    def _log(db: sqlite3.Connection, job_id: str, line: str) -> None:
        db.execute(
            "INSERT INTO logs (job_id, time, line) VALUES (?, ?, ?)", (job_id, time.time(), line)
        )

    def append_log(self, job_id: str, line: str) -> None:
        with self._tx() as db:
            self._fetch(db, job_id)  # no orphan log lines for mistyped ids
            self._log(db, job_id, line)

    # --- sweeps ---

    def create_sweep(self, name: str, spec: dict, template: dict, path: str) -> None:
        """A new sweep (its trials are submitted later, one by one, by the controller).

        `path` is its file's: relative paths among its parameters' values are taken there."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sweeps WHERE name = ?", (name,)).fetchone():
                raise SweepExistsError(name)
            now = time.time()
            db.execute(
                "INSERT INTO sweeps (name, spec, template, path, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (name, _spec_json(spec), _spec_json(template), str(path), now, now),
            )

    def sweeps(self, states: Iterable[str] | None = None) -> list[SweepRecord]:
        sql, args = "SELECT * FROM sweeps", list(states or [])
        if states is not None:
            sql += f" WHERE state IN ({','.join('?' * len(args))})"
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at", args).fetchall()
        return [SweepRecord.from_row(r) for r in rows]

    def sweep(self, name: str) -> SweepRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM sweeps WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownSweepError(name)
        return SweepRecord.from_row(row)

    def set_sweep_state(self, name: str, state: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE sweeps SET state = ?, updated_at = ? WHERE name = ?",
                (state, time.time(), name),
            )

    def submit_trial(
        self, sweep: str, number: int, params: dict, job: tuple[str, dict, str, int]
    ) -> str:
        """Queue a sweep's trial as an ordinary job, and record it as the trial, at once."""
        name, spec, base_model, priority = job
        with self._tx() as db:
            job_id = new_job_id(name)
            now = time.time()
            db.execute(
                "INSERT INTO jobs (id, name, spec, base_model, priority, state,"
                " submitted_at, updated_at, state_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, _spec_json(spec), base_model, int(priority), "queued", now, now,
                 self._next_state_seq(db)),
            )  # fmt: skip
            db.execute(
                "INSERT INTO sweep_trials (sweep, number, job_id, params) VALUES (?, ?, ?, ?)",
                (sweep, int(number), job_id, json.dumps(params)),
            )
            self._log(db, job_id, f"queued: trial {number} of sweep {sweep}")
        return job_id

    def trials(self, sweep: str) -> list[TrialRecord]:
        """A sweep's trials by number, each with its job's record."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT t.number, t.params, t.reported, t.best, t.told, j.* FROM sweep_trials t"
                " JOIN jobs j ON j.id = t.job_id WHERE t.sweep = ? ORDER BY t.number",
                (sweep,),
            ).fetchall()
        out = []
        for row in rows:
            d = dict(zip(row.keys(), row, strict=True))
            number, params = d.pop("number"), json.loads(d.pop("params"))
            reported, best, told = d.pop("reported"), d.pop("best"), bool(d.pop("told"))
            job = JobRecord.from_columns(d)
            out.append(TrialRecord(sweep, number, params, reported, best, told, job))
        return out

    def update_trial(
        self, sweep: str, number: int, *, reported: int, best: float | None, told: bool
    ) -> None:
        """What the search has been told of a trial: how many history entries, its best
        metric, and whether it knows how the trial ended."""
        with self._tx() as db:
            db.execute(
                "UPDATE sweep_trials SET reported = ?, best = ?, told = ?"
                " WHERE sweep = ? AND number = ?",
                (int(reported), _real(best), int(told), sweep, int(number)),
            )

    def recover_running(self) -> list[JobRecord]:
        """After a controller restart no group survives: requeue every running job at once.

        Jobs with a pending cancel come back cancelled instead; all are returned.
        """
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
            line = "requeued after controller restart"
            return [self._requeue(db, JobRecord.from_row(r), line) for r in rows]
