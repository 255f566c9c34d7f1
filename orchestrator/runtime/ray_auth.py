"""Ray's token authentication, kept on: a token for a local head, a clear error for a remote one.

Ray looks for the token in `$RAY_AUTH_TOKEN`, then the file `$RAY_AUTH_TOKEN_PATH`,
then `~/.ray/auth_token`. `ray start` refuses to start a head in token mode when
none is found; `ray get-auth-token --generate` would write one, readable by
everyone on the machine. carpool writes it itself, readable by its owner only,
where Ray's lookup finds it again for every later command and worker.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"


class MissingRayTokenError(RuntimeError):
    """Token authentication is on and no token can be found for a cluster carpool did not start."""


def token_mode_on() -> bool:
    return os.environ.get(AUTH_MODE_VAR, "").lower() == "token"


def token_file() -> Path:
    """Where Ray reads the token from when `$RAY_AUTH_TOKEN` is not set."""
    custom = os.environ.get(TOKEN_PATH_VAR)
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def has_token() -> bool:
    """Whether Ray's own lookup finds a token (variable or file)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # it caches a miss; the file may have been written since
    try:
        return loader.has_token(ignore_auth_mode=True)
    except AuthenticationError:  # $RAY_AUTH_TOKEN_PATH names a missing or empty file
        return False


def ensure_local_token() -> Path | None:
    """Create a token for a local head when token mode is on and none exists.

    Returns the file it wrote, or None when nothing was needed.
    """
    if not token_mode_on() or has_token():
        return None
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # O_EXCL: two `carpool up`s at once must not overwrite each other's token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    return path


def require_token(address: str) -> None:
    """Refuse, in one line, to attach to `address` without a token when token mode is on."""
    if token_mode_on() and not has_token():
        raise MissingRayTokenError(
            f"the Ray cluster at {address} uses token authentication and no token was found: "
            f"set {TOKEN_VAR} to the cluster's token, or {TOKEN_PATH_VAR} to a file holding it "
            "(`ray get-auth-token` on the head node prints it)"
        )


def where_token_is() -> str:
    """How a user finds the token, e.g. to sign in to the dashboard."""
    if os.environ.get(TOKEN_VAR):
        return f"the token is in ${TOKEN_VAR}"
    with contextlib.suppress(OSError):
        home = Path.home()
        path = token_file()
        if path.is_relative_to(home):
            return f"`ray get-auth-token` prints the token (in ~/{path.relative_to(home)})"
    return f"`ray get-auth-token` prints the token (in {token_file()})"
