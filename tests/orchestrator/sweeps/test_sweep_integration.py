"""A sweep through the real CLI on local Ray: submit, a `down`/`up` in the middle, status,
plot, fetch of the best trial, and `wait` taking pruned trials as an end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime.client import Client
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.cluster import carpool_cluster, wait_for
from tests.orchestrator.sweeps.sweep_files import write_sweep

pytestmark = pytest.mark.integration


def sweep_file(root: Path, base: Path, datasets: dict[str, Path]) -> Path:
    return write_sweep(
        root,
        base,
        datasets["text"],
        datasets["prompt_completion"],
        {"max_steps": 12, "eval_steps": 2, "save_steps": 2},
        name="ride",
        parameters={"training.learning_rate": {"choices": [3.0e-3, 3.0e-2, 1.0e-6, 1.0e-7]}},
        trials=4,
        sampler="grid",
        seed=1,
        pruner="median",
        pruner_options={"n_startup_trials": 1, "n_warmup_steps": 2},
        max_concurrent=2,
    )


def test_sweep_submit_restart_status_plot_fetch(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    path = sweep_file(tmp_path, tiny_base, datasets)
    state = ["--state-dir", str(tmp_path / "state")]
    # The controller restarts (down, up); Ray, the suite's shared head, stays.
    with carpool_cluster(tmp_path, shared_ray_head, max_groups=1) as client:
        assert main(["sweep", "submit", str(path), *state]) == 0
        assert "sweep ride submitted" in capsys.readouterr().out
        wait_for(
            lambda: any(t["job"]["step"] >= 3 for t in client.sweep_status("ride")["trials"]),
            what="a trial past its first eval",
        )
        client.down()  # the sweep's trials go back to the queue; its search state stays
        client = Client.up(tmp_path / "operator.yaml", address=shared_ray_head)
        wait_for(
            lambda: client.sweep_status("ride")["sweep"]["state"] == "done",
            timeout=300,
            what="the sweep done",
        )
        trials = client.sweep_status("ride")["trials"]
        assert sorted(t["number"] for t in trials) == [0, 1, 2, 3]
        states = {t["params"]["training.learning_rate"]: t["job"]["state"] for t in trials}
        assert set(states.values()) <= {"succeeded", "pruned"}

        assert main(["sweep", "status", "ride", *state, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        best = status["best"]
        assert best is not None and best["job"]["state"] == best["state"] == "succeeded"
        # Each trial's state and step beside its best, as the table shows them.
        assert all(
            (t["state"], t["step"]) == (t["job"]["state"], t["job"]["step"])
            for t in status["trials"]
        )
        assert main(["sweep", "status", "ride", *state]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[2].startswith("*")  # ranked by metric: the best first, marked

        assert main(["sweep", "plot", "ride", "--out", str(tmp_path / "sweep.png"), *state]) == 0
        assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
        assert main(["sweep", "fetch", "ride", "--out", str(tmp_path / "best"), *state]) == 0
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        PeftModel.from_pretrained(base, tmp_path / "best")  # PEFT's format, as every adapter
        ids = [t["job"]["id"] for t in trials]
        assert main(["wait", *ids, *state]) == 0  # pruned is an end, not an error
