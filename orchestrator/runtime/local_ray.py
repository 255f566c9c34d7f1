"""Start and stop a Ray head on this machine, touching no other Ray.

`ray stop` ends every Ray process on the machine, another user's cluster
included. carpool stops only the cluster it started: the processes whose
command line names its GCS address or its session, and their descendants
(worker processes rename themselves `ray::...`, but stay the raylet's children).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from carpool.orchestrator.runtime.ray_auth import ensure_local_token

_SESSION = re.compile(r"session_\d{4}-\d{2}-\d{2}_[\d_-]+")


def free_port() -> int:
    """A TCP port that was free a moment ago (good enough for a local head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The `ray` script of this interpreter's environment."""
    return str(Path(sys.executable).with_name("ray"))


class RayStartError(RuntimeError):
    """`ray start` failed; the message ends with the last lines it printed."""


@dataclass(frozen=True)
class LocalHead:
    address: str  # GCS address, as other nodes and clients join it
    dashboard_url: str
    created_token: Path | None  # the auth token file written for it, if one was needed


def start_head(num_cpus: int | None = None) -> LocalHead:
    """`ray start --head` on free ports, with an auth token in token mode.

    On failure nothing of the head is left running.
    """
    created_token = ensure_local_token()
    port, dash, metrics = free_port(), free_port(), free_port()
    cmd = [
        ray_cli(), "start", "--head", f"--port={port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--metrics-export-port={metrics}", "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    # The head binds its node IP; `ray start` prints the address others join with.
    found = re.search(r"ray start --address='([^']+)'", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        # It may have got as far as starting the GCS: stop whatever names our port.
        stop_cluster(f"127.0.0.1:{port}")
        raise RayStartError(f"ray start failed (exit {done.returncode}):\n{_tail(done)}")
    return LocalHead(found.group(1), f"http://127.0.0.1:{dash}", created_token)


def _tail(done: subprocess.CompletedProcess, lines: int = 8) -> str:
    """The last lines `ray start` printed, stderr first (where its errors go)."""
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return "\n".join(f"  {line}" for line in text[-lines:])


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def cluster_processes(gcs_address: str) -> list[psutil.Process]:
    """This machine's processes of the Ray cluster whose GCS listens on `gcs_address`."""
    port = gcs_address.rpartition(":")[2]
    own = {f"--gcs-address={gcs_address}", f"--address={gcs_address}", f"--gcs_server_port={port}"}
    procs = list(psutil.process_iter())
    command_lines = {p.pid: _cmdline(p) for p in procs}
    # The processes that name our GCS tell us the session; every other daemon
    # of the cluster (log monitor, dashboard, ...) names that session.
    sessions = {
        match
        for args in command_lines.values()
        if own.intersection(args)
        for match in _SESSION.findall(" ".join(args))
    }
    roots = [
        p
        for p in procs
        if own.intersection(command_lines[p.pid])
        or any(s in a for a in command_lines[p.pid] for s in sessions)
    ]
    keep = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        found.update((p.pid, p) for p in family if p.pid not in keep)
    return list(found.values())


def stop_cluster(gcs_address: str, grace_s: float = 2.0) -> int:
    """Terminate this machine's processes of that cluster; SIGKILL what outlives `grace_s`.

    Raylets go first (their workers follow them), the GCS last, as `ray stop`
    orders it. The GCS and the autoscaler monitor ignore SIGTERM for many seconds;
    they hold nothing carpool needs (the controller has saved its jobs by then).
    Returns how many processes were signalled.
    """
    procs = cluster_processes(gcs_address)

    def order(proc: psutil.Process) -> int:
        with contextlib.suppress(psutil.Error):
            return {"raylet": 0, "gcs_server": 2}.get(proc.name(), 1)
        return 1

    for proc in sorted(procs, key=order):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    alive = _wait_gone(procs, grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _wait_gone(alive, 10.0)
    return len(procs)


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (whose parent, not us, has yet to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `procs` is alive or `timeout_s` passes; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if is_alive(p)]
    return alive
