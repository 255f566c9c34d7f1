"""`carpool sweep status --json`: one document; each trial's state and step beside its best."""

from __future__ import annotations

import json

import pytest
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime.client import Client


def trial(number: int, state: str, step: int, best: float | None) -> dict:
    job = {"id": f"ride-t{number:02d}-abc", "state": state, "step": step, "total_steps": 10}
    return {"number": number, "params": {"training.learning_rate": 0.01}, "best": best, "job": job}


def test_sweep_status_json_gives_each_trial_its_state_and_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    status = {
        "sweep": {
            "name": "ride",
            "state": "running",
            "spec": {"trials": 3, "sampler": "grid", "pruner": "none", "parameters": {}},
        },
        "trials": [trial(0, "succeeded", 10, 0.5), trial(1, "running", 4, 0.7), trial(2, "queued", 0, None)],
    }  # fmt: skip
    monkeypatch.setattr(Client, "sweep_status", lambda self, name: status)
    assert main(["sweep", "status", "ride", "--state-dir", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)  # one document
    assert [(t["number"], t["state"], t["step"]) for t in shown["trials"]] == [
        (0, "succeeded", 10),
        (1, "running", 4),
        (2, "queued", 0),
    ]
    assert (shown["best"]["number"], shown["best"]["state"], shown["best"]["step"]) == (
        0,
        "succeeded",
        10,
    )
