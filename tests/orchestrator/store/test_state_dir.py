"""Every command finds the same state directory: flag, variable, last `up`, default."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.store.state_dir import (
    find_state_dir,
    record_last_up,
    shadowing_variable,
    state_dir_for_up,
)


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CARPOOL_STATE_DIR", raising=False)
    return tmp_path


def test_precedence_flag_then_variable_then_last_up_then_default(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = clean_env / "home"
    assert find_state_dir() == home / ".carpool"
    record_last_up(clean_env / "from-config")
    assert find_state_dir() == (clean_env / "from-config").resolve()
    monkeypatch.setenv("CARPOOL_STATE_DIR", str(clean_env / "from-env"))
    assert find_state_dir() == clean_env / "from-env"
    assert find_state_dir(clean_env / "from-flag") == clean_env / "from-flag"


def test_up_takes_flag_config_variable_default_but_never_the_last_up(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_last_up(clean_env / "earlier")
    assert state_dir_for_up(None, None) == clean_env / "home" / ".carpool"
    assert state_dir_for_up(None, clean_env / "cfg") == clean_env / "cfg"
    monkeypatch.setenv("CARPOOL_STATE_DIR", str(clean_env / "env"))
    assert state_dir_for_up(None, None) == clean_env / "env"
    assert state_dir_for_up(None, clean_env / "cfg") == clean_env / "cfg"
    assert shadowing_variable(clean_env / "cfg") == clean_env / "env"  # `up` warns of it
    assert shadowing_variable(clean_env / "env") is None
    assert state_dir_for_up(clean_env / "flag", clean_env / "cfg") == clean_env / "flag"
