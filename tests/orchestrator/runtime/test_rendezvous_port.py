"""A group's rendezvous port comes from outside the ports other processes take unasked."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
from carpool.orchestrator.runtime import ray_runtime
from carpool.orchestrator.runtime.ray_runtime import rendezvous_port


def test_the_port_is_free_and_outside_the_ephemeral_and_ray_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("32768\t60999\n")
    monkeypatch.setattr(ray_runtime, "_EPHEMERAL_RANGE", ephemeral)
    for _ in range(20):
        port = rendezvous_port()
        assert 20000 <= port < 32768
        with socket.socket() as sock:
            sock.bind(("", port))  # free when chosen


def test_port_zero_when_no_port_there_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("20001 60999\n")  # one candidate: 20000
    monkeypatch.setattr(ray_runtime, "_EPHEMERAL_RANGE", ephemeral)
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # taken already: the same case
            taken.bind(("", 20000))
        assert rendezvous_port() != 20000
