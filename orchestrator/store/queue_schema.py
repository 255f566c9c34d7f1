"""The queue file's SQLite schema and the steps that bring older files up to it.

A new file gets `SCHEMA` (schema 1) and then every step of `MIGRATIONS`, so a file
made by an older carpool ends up exactly like a new one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 4  # PRAGMA user_version; bump with a step in MIGRATIONS


# "group" is an SQL keyword, hence group_id. seq gives first-come order.
SCHEMA = """
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
"""

# Step n takes a file from schema n-1 to n; a new file gets SCHEMA (schema 1) and
# then every step, so files made by older carpools end up exactly like new ones.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # state_seq: a counter over the whole queue, bumped by every change of a job's
    # state or cancel request, so a reader fetches only what changed since its last read.
    2: (
        "ALTER TABLE jobs ADD COLUMN state_seq INTEGER NOT NULL DEFAULT 0",
        "UPDATE jobs SET state_seq = seq",
        "CREATE INDEX jobs_by_state_seq ON jobs (state_seq)",
    ),
    # history: each job's loss history (HF log_history entries), append-only. A job
    # resumed from a checkpoint redoes the steps after it; their entries are already
    # here (the same, the run being deterministic), so (job, step, kind) is unique
    # and the repeat is ignored.
    3: (
        "CREATE TABLE history (n INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,"
        " step INTEGER NOT NULL, kind TEXT NOT NULL, entry TEXT NOT NULL)",
        "CREATE UNIQUE INDEX history_by_job ON history (job_id, step, kind)",
    ),
    # Sweeps: each one's file as parsed (spec, template) and state; each trial's job,
    # its parameters, how many of its history entries the search has been told, its
    # best metric so far, and whether the search has been told how it ended.
    4: (
        "CREATE TABLE sweeps (name TEXT PRIMARY KEY, spec TEXT NOT NULL, template TEXT NOT NULL,"
        " path TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL)",
        "CREATE TABLE sweep_trials (sweep TEXT NOT NULL, number INTEGER NOT NULL,"
        " job_id TEXT NOT NULL UNIQUE, params TEXT NOT NULL, reported INTEGER NOT NULL DEFAULT 0,"
        " best REAL, told INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (sweep, number))",
    ),
}


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the open file `db` (at `path`, for the message) to `SCHEMA_VERSION`."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"{path}: schema {version} is newer than this carpool's")
    if version == 0:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        version = 1
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
