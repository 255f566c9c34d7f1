"""Which state directory a command uses, the same way for every command.

Precedence, highest first: an explicit `--state-dir`, `$CARPOOL_STATE_DIR`,
the directory the last successful `carpool up` on this machine recorded for
this user, `~/.carpool`. `carpool up` itself takes an explicit flag, then the
operator config's `state_dir` (the file named on its command line), then the
variable, then the default, and records what it used: so a directory chosen in
a config file is found by `submit`, `status`, `down` and the rest without a
flag or a variable.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_VAR = "CARPOOL_STATE_DIR"
DEFAULT_STATE_DIR = "~/.carpool"


def last_up_record() -> Path:
    """The per-user file naming the last `carpool up`'s state directory (XDG state home)."""
    state_home = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(state_home).expanduser() / "carpool" / "last-state-dir"


def record_last_up(state_dir: Path) -> None:
    record = last_up_record()
    record.parent.mkdir(parents=True, exist_ok=True)
    staged = record.with_suffix(".tmp")
    staged.write_text(str(Path(state_dir).expanduser().resolve()) + "\n")
    staged.replace(record)  # atomic: a reader never sees half a path


def _recorded() -> Path | None:
    try:
        text = last_up_record().read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def _explicit_or_env(explicit: str | Path | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(STATE_DIR_VAR)
    return Path(from_env).expanduser() if from_env else None


def find_state_dir(explicit: str | Path | None = None) -> Path:
    """The state directory of the carpool a command talks to."""
    return _explicit_or_env(explicit) or _recorded() or Path(DEFAULT_STATE_DIR).expanduser()


def state_dir_for_up(explicit: str | Path | None, configured: Path | None) -> Path:
    """The state directory `carpool up` starts in: flag, the config's, variable, then the default."""
    if explicit:
        return Path(explicit).expanduser()
    return configured or _explicit_or_env(None) or Path(DEFAULT_STATE_DIR).expanduser()


def shadowing_variable(state_dir: Path) -> Path | None:
    """$CARPOOL_STATE_DIR when it names another directory than `state_dir`: other
    commands would look there, not where `carpool up` just started."""
    from_env = _explicit_or_env(None)
    if from_env is None or from_env.resolve() == Path(state_dir).resolve():
        return None
    return from_env
