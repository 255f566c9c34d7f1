"""`carpool logs --follow`: every line once, in order, ending when the job is final."""

from __future__ import annotations

from pathlib import Path

from carpool.orchestrator.runtime.client import Client


class ScriptedClient(Client):
    """A client whose controller replays a script: (state, lines written so far) per poll."""

    def __init__(self, state_dir: Path, script: list[tuple[str, list[str]]]) -> None:
        super().__init__(state_dir)
        self.script = script
        self.tick = -1
        self.polls = 0

    def status(self, job_id: str | None = None) -> list[dict]:
        self.tick = min(self.tick + 1, len(self.script) - 1)
        self.polls += 1
        return [{"id": job_id, "state": self.script[self.tick][0]}]

    def logs(self, job_id: str, since: int = 0) -> list[str]:
        # A line may land after the state was read: show one more once running.
        state, lines = self.script[self.tick]
        later = self.script[min(self.tick + 1, len(self.script) - 1)][1]
        visible = lines if state != "running" else later
        return visible[since:]


def test_follow_prints_each_line_once_and_stops_when_final(tmp_path: Path) -> None:
    script = [
        ("queued", ["queued"]),
        ("running", ["queued", "started"]),
        ("running", ["queued", "started", "step 10/20"]),
        ("running", ["queued", "started", "step 10/20", "step 20/20"]),
        ("succeeded", ["queued", "started", "step 10/20", "step 20/20", "succeeded: adapter"]),
    ]
    client = ScriptedClient(tmp_path, script)
    lines = list(client.follow_logs("job-1", poll_s=0))
    assert lines == script[-1][1]
    assert client.polls == len(script)


def test_follow_of_a_finished_job_prints_its_log_and_returns(tmp_path: Path) -> None:
    client = ScriptedClient(tmp_path, [("failed", ["queued", "failed: loss is nan"])])
    assert list(client.follow_logs("job-1", poll_s=0)) == ["queued", "failed: loss is nan"]
    assert client.polls == 1
