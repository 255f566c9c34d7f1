"""`carpool plot` and `carpool status JOB --history`, without Ray: the client's calls go to a
queue driven directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.workers.training.training_history import trainer_state, write_trainer_state

PNG = b"\x89PNG\r\n\x1a\n"


def _entries(steps: int, eval_every: int) -> list[dict]:
    out: list[dict] = []
    for step in range(10, steps + 1, 10):
        out.append({"loss": 3.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5, "step": step})
        if step % eval_every == 0:
            out.append({"eval_loss": 4.0 / step, "epoch": step / 20, "step": step})
    return out


class QueueController:
    """The controller actor's read methods the CLI calls, on a queue file."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def history(self, job_id: str, since: int = 0) -> list[dict]:
        return self.queue.history(job_id, since)


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CARPOOL_STATE_DIR", str(tmp_path / "state"))
    q = JobQueue(tmp_path / "state" / "queue.sqlite")
    controller = QueueController(q)
    monkeypatch.setattr(Client, "_call", lambda self, method, *a: getattr(controller, method)(*a))
    yield q
    q.close()


def _trained_job(queue: JobQueue, name: str) -> str:
    (job_id,) = queue.submit([(name, {}, "base", 0)])
    queue.mark_running(job_id, "g")
    progress = dict(total_steps=40, loss=1.0, tokens_per_second=1.0)
    queue.record_progress(job_id, step=20, **progress, history=_entries(20, 20))
    queue.record_progress(job_id, step=40, **progress, history=_entries(40, 20)[3:])
    return job_id


def _adapter_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    state = trainer_state(
        _entries(50, 25), global_step=50, max_steps=50, epoch=2.5, logging_steps=10,
        eval_steps=25, save_steps=50, train_batch_size=4, num_input_tokens_seen=1000,
    )  # fmt: skip
    write_trainer_state(root, state)
    return root


def test_plot_draws_queue_jobs_and_adapter_dirs_on_one_png(
    queue: JobQueue, tmp_path: Path, capsys
) -> None:
    job_id = _trained_job(queue, "queued-job")
    adapter = _adapter_dir(tmp_path / "adapters" / "local-job")
    out = tmp_path / "figs" / "curves.png"

    assert main(["plot", job_id, str(adapter), "--out", str(out)]) == 0

    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(PNG)


def test_status_history_prints_the_table_or_json(queue: JobQueue, capsys) -> None:
    job_id = _trained_job(queue, "job")

    assert main(["status", job_id, "--history"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == [
        "STEP", "EPOCH", "LOSS", "EVAL_LOSS", "LR", "GRAD_NORM", "TOKENS",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == ["10", "20", "20", "30", "40", "40"]
    assert rows[1].split()[2] == f"{3.0 / 20:.4f}" and rows[2].split()[3] == f"{4.0 / 20:.4f}"

    assert main(["status", job_id, "--history", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _entries(40, 20)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plot", "{tmp}"], "no trainer_state.json"),
        (["plot", "{tmp}/missing/adapter"], "not a directory with trainer_state.json"),
        (["plot", "nosuch-job-1"], "unknown job id 'nosuch-job-1'"),
        (["plot", "Bad Id"], "invalid job id"),
        (["status", "--history"], "--history needs a JOB"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    queue: JobQueue, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_a_failing_plot_loads_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from carpool.orchestrator.cli.main import main; "
        f"print(main(['plot', {str(tmp_path)!r}]), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "False"]
