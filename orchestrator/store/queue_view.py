"""The controller's copy of the queue in memory, kept current from what changed.

Reading every queued job (and decoding its spec) on every tick made each round
of every running job cost time in proportion to the queue. The view reads only
the jobs whose state changed since its last read (`JobQueue.changed_since`), so
a tick with nothing new costs one indexed query, whatever the queue's length.
Writers in other processes (the CLI's submit and cancel) are seen the same way.
"""

from __future__ import annotations

from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobRecord, JobState


class QueueView:
    """Queued and running jobs by id, and how many jobs are in each state."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.queued: dict[str, JobRecord] = {}
        self.running: dict[str, JobRecord] = {}
        self.counts: dict[JobState, int] = dict.fromkeys(JobState, 0)
        self._seen = 0  # the last state_seq read

    def refresh(self) -> list[JobRecord]:
        """Take in the jobs changed since the last refresh; returns them as they are now."""
        changed = self.queue.changed_since(self._seen)
        for record in changed:
            self._take(record)
        if changed:
            self._seen = changed[-1].state_seq
        return changed

    def _take(self, record: JobRecord) -> None:
        before = self.queued.pop(record.id, None) or self.running.pop(record.id, None)
        # A job not held here is new to the view (or, on the first read, already
        # final): final states never change again, so it is never counted twice.
        if before is not None:
            self.counts[before.state] -= 1
        self.counts[record.state] += 1
        if record.state == JobState.QUEUED:
            self.queued[record.id] = record
        elif record.state == JobState.RUNNING:
            self.running[record.id] = record
