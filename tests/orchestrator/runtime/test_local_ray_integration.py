"""`carpool down` stops its own Ray head and leaves any other Ray on the machine running."""

from __future__ import annotations

import socket

import psutil
import pytest
from carpool.orchestrator.runtime.local_ray import (
    cluster_processes,
    is_alive,
    start_head,
    stop_cluster,
)

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:  # it ended since it was listed
        return ""


def test_stopping_one_head_leaves_another_running() -> None:
    ours = start_head(num_cpus=1).address
    try:
        bystander = start_head(num_cpus=1).address
    except BaseException:
        stop_cluster(ours)
        raise
    try:
        mine = cluster_processes(ours)
        theirs = cluster_processes(bystander)
        names = {name(p) for p in mine}
        assert {"gcs_server", "raylet"} <= names, names
        assert not {p.pid for p in mine} & {p.pid for p in theirs}
        daemons = [p for p in theirs if name(p) in ("gcs_server", "raylet")]
        assert len(daemons) == 2

        assert stop_cluster(ours) >= len(names)
        assert not listening(ours)
        assert not any(is_alive(p) for p in mine)
        assert cluster_processes(ours) == []
        # The other cluster is whole: its GCS answers and its daemons live. (Not every
        # process: a raylet may retire an idle worker of its own accord.)
        assert listening(bystander)
        assert all(is_alive(p) for p in daemons)
    finally:
        stop_cluster(bystander)
    assert not listening(bystander)
