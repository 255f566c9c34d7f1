"""`Client.up` that fails half-way leaves nothing behind (fakes: no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.runtime import client as client_module
from carpool.orchestrator.runtime.client import CLUSTER_FILE, Client
from carpool.orchestrator.runtime.local_ray import LocalHead
from carpool.orchestrator.store.state_dir import last_up_record


def test_a_controller_that_cannot_start_takes_the_new_head_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    head = LocalHead("127.0.0.1:6390", "http://127.0.0.1:8265", created_token=None)
    stopped: list[str] = []
    monkeypatch.setattr(client_module, "start_head", lambda num_cpus: head)
    monkeypatch.setattr(client_module, "stop_cluster", stopped.append)
    monkeypatch.setattr(Client, "_disconnect", lambda self: None)

    def controller_fails(self: Client, cluster: dict) -> None:
        raise RuntimeError("controller actor died at start")

    monkeypatch.setattr(Client, "_start_controller", controller_fails)
    with pytest.raises(RuntimeError, match="controller actor died"):
        Client.up(state_dir=tmp_path / "state")
    assert stopped == [head.address]
    assert not (tmp_path / "state" / CLUSTER_FILE).exists()
    assert not last_up_record().exists()  # later commands are not pointed at it
