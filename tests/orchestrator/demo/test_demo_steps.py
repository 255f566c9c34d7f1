"""`make demo` stops at the first failing command, with that command's error, exit non-zero."""

from __future__ import annotations

import sys
from pathlib import Path

import carpool.orchestrator.cli.main as cli_module
import pytest
from carpool.orchestrator.demo import run as demo


def test_a_failing_up_stops_the_demo_before_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # The demo points CARPOOL_STATE_DIR at its own queue when unset: restored after the test.
    monkeypatch.setenv("CARPOOL_STATE_DIR", "")
    monkeypatch.delenv("CARPOOL_STATE_DIR")
    monkeypatch.setattr(demo, "prepare", lambda root: [tmp_path / "jobs" / "shout.yaml"])
    calls: list[list[str]] = []

    def carpool(argv: list[str]) -> int:
        calls.append(argv)
        print("error: ray start failed (exit 1):\n  AuthenticationError: no token", file=sys.stderr)
        return 1

    monkeypatch.setattr(cli_module, "main", carpool)
    assert demo.main() == 1
    assert [argv[0] for argv in calls] == ["up"]  # no submit, no `down` with a misleading message
    err = capsys.readouterr().err
    assert "AuthenticationError: no token" in err
    assert err.strip().endswith(
        "`carpool up --config demo_out/operator.yaml` exited with status 1 (its error is above)"
    )
