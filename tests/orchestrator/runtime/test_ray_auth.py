"""Ray's token authentication stays on; carpool makes the token a local head needs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime import ray_auth


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return home


def test_a_missing_token_is_created_owner_only_and_then_reused(empty_home: Path) -> None:
    assert not ray_auth.has_token()
    path = ray_auth.ensure_local_token()
    assert path == empty_home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # Ray's format: 256 bits, hex
    assert ray_auth.has_token()  # found again through Ray's own lookup
    assert ray_auth.ensure_local_token() is None
    assert path.read_text() == token


def test_the_token_goes_where_ray_auth_token_path_points(
    empty_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    custom = tmp_path / "secrets" / "ray-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    assert ray_auth.ensure_local_token() == custom
    assert stat.S_IMODE(custom.stat().st_mode) == 0o600
    assert not (empty_home / ".ray").exists()


@pytest.mark.parametrize(
    "variable, value", [("RAY_AUTH_TOKEN", "ab" * 32), ("RAY_AUTH_MODE", "disabled")]
)
def test_nothing_is_written_when_no_token_is_needed(
    empty_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert ray_auth.ensure_local_token() is None
    assert not (empty_home / ".ray").exists()


def test_attaching_to_a_remote_cluster_without_a_token_is_one_line(
    empty_home: Path, capsys
) -> None:
    assert main(["up", "--address", "10.0.0.1:6379", "--state-dir", str(empty_home / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "10.0.0.1:6379" in err and "RAY_AUTH_TOKEN" in err and "RAY_AUTH_TOKEN_PATH" in err
    assert not (empty_home / ".ray").exists()  # a remote cluster's token is never invented
    assert not (empty_home / "s" / "cluster.json").exists()
