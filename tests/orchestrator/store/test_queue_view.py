"""The controller's in-memory view of the queue: current after each refresh, from any writer."""

from __future__ import annotations

from pathlib import Path

from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobRecord, JobState
from carpool.orchestrator.store.queue_view import QueueView

Q, R, S, F, C = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)


def test_view_follows_every_transition_and_counts_like_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with JobQueue(path) as queue, JobQueue(path) as cli:  # cli: another process's connection
        done, failed = queue.submit([("done", {}, "m", 0), ("failed", {}, "m", 0)])
        queue.mark_running(done, "g0")
        queue.record_progress(done, step=1, total_steps=1, loss=1.0, tokens_per_second=1.0,
                              adapter="/a")  # fmt: skip
        view = QueueView(queue)  # a restarted controller: finished jobs are counted too
        view.refresh()
        assert (set(view.queued), set(view.running)) == ({failed}, set())

        running, requeued = cli.submit([("running", {}, "m", 1), ("requeued", {}, "m", 0)])
        queue.mark_running(running, "g0")
        queue.mark_running(requeued, "g0")
        queue.requeue(requeued, "group lost")
        queue.finish(failed, F)
        cancelled = cli.submit([("cancelled", {}, "m", 0)])[0]
        cli.request_cancel(cancelled)
        cli.request_cancel(running)

        assert {r.id for r in view.refresh()} == {failed, running, requeued, cancelled}
        assert set(view.queued) == {requeued}
        assert set(view.running) == {running}
        assert view.running[running].cancel_requested
        assert view.queued[requeued].spec == {}
        assert view.counts == queue.counts() == {Q: 1, R: 1, S: 1, F: 1, C: 1, JobState.PRUNED: 0}
        assert view.refresh() == []


def test_a_refresh_decodes_only_the_jobs_that_changed(tmp_path: Path, monkeypatch) -> None:
    with JobQueue(tmp_path / "queue.db") as queue:
        ids = queue.submit([(f"j{i}", {"i": i}, "m", 0) for i in range(50)])
        view = QueueView(queue)
        assert len(view.refresh()) == 50

        decoded: list[str] = []
        from_row = JobRecord.from_row
        monkeypatch.setattr(
            JobRecord, "from_row", lambda row: decoded.append(row["id"]) or from_row(row)
        )
        queue.append_log(ids[0], "a log line is no change of state")
        decoded.clear()  # append_log decodes the job it checks
        assert view.refresh() == []
        assert decoded == []

        queue.request_cancel(ids[7])
        decoded.clear()  # request_cancel decodes the job it changes
        assert [r.id for r in view.refresh()] == [ids[7]]
        assert decoded == [ids[7]]
        assert len(view.queued) == 49
