"""CLI calls that must fail cleanly: no controller up, bad ids, bad specs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.cli.main import main


@pytest.fixture(autouse=True)
def empty_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CARPOOL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "some-job-1"],
        ["logs", "some-job-1"],
        ["cancel", "some-job-1"],
        ["wait", "some-job-1"],
        ["fetch", "some-job-1", "--out", "x"],
        ["down"],
        ["sweep", "status", "some-sweep"],
        ["sweep", "cancel", "some-sweep"],
    ],
)
def test_no_controller_is_one_line_and_exit_1(argv: list[str], capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no carpool" in err and "is up" in err


def test_a_queue_command_that_fails_loads_no_torch() -> None:
    """Telling the user no controller is up needs none of the training stack's imports."""
    code = (
        "import sys; from carpool.orchestrator.cli.main import main; "
        "print(main(['status']), 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "False", "False"]


def test_looking_up_the_controller_actor_loads_no_torch() -> None:
    """Ray imports the actor class's module in every client that looks the controller up
    (`carpool status`); that module leaves the training stack to the actor itself."""
    code = (
        "import sys; import carpool.orchestrator.runtime.controller_actor, carpool.orchestrator.runtime.client; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["logs", "../etc/passwd"], ["cancel", "A/B"], ["status", ".."]])
def test_invalid_job_ids_are_refused_before_anything(argv: list[str], capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid job id") and len(err.splitlines()) == 1


def test_submit_reports_every_problem_and_queues_nothing(
    tmp_path: Path, empty_state_dir: Path, capsys
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "Bad!",
                "base_model": str(tmp_path / "missing-model"),
                "dataset": {"path": str(tmp_path / "missing.jsonl")},
                "adapter": {"r": 0},
                "training": {"max_steps": 5, "num_epochs": 1, "batch_size": 0},
            }
        )
    )
    assert main(["submit", str(spec)]) == 1
    err = capsys.readouterr().err
    for field in (
        "name",
        "adapter.r",
        "training.batch_size",
        "training.max_steps",
        "base_model",
        "dataset.path",
    ):
        assert f": {field}:" in err, field
    assert not (empty_state_dir / "queue.sqlite").exists()


@pytest.mark.parametrize(
    ("states", "code"),
    [
        ({"a": "succeeded", "b": "pruned"}, 0),  # a pruned trial ended as its sweep chose
        ({"a": "succeeded", "b": "cancelled"}, 1),
        ({"a": "failed"}, 1),
    ],
)
def test_wait_takes_pruned_as_an_end_that_is_no_error(
    states: dict[str, str], code: int, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from carpool.orchestrator.runtime import client as client_module

    monkeypatch.setattr(client_module.Client, "wait", lambda self, ids, timeout=None: states)
    assert main(["wait", *states]) == code
    assert capsys.readouterr().out.split() == [w for kv in states.items() for w in kv]


@pytest.mark.parametrize(
    ("state", "fetched"), [("pruned", True), ("succeeded", True), ("failed", False)]
)
def test_fetch_takes_a_pruned_trials_adapter(
    state: str, fetched: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from carpool.orchestrator.control.operator_config import OperatorConfig
    from carpool.orchestrator.runtime import client as client_module

    config = OperatorConfig.model_validate({"state_dir": str(tmp_path / "state")})
    monkeypatch.setattr(client_module.Client, "config", property(lambda self: config))
    monkeypatch.setattr(client_module.Client, "status", lambda self, job_id: [{"state": state}])
    monkeypatch.setattr(
        client_module.ArtifactStore, "fetch_adapter", lambda self, job_id, out: Path(out)
    )
    code = main(["fetch", "job-1", "--out", str(tmp_path / "out")])
    assert code == (0 if fetched else 1)
    if not fetched:
        assert "is failed, not succeeded (or pruned)" in capsys.readouterr().err
