"""A newcomer's first run: an empty HOME, no Ray token anywhere, the real `carpool` command.

Every command runs as its own process, as a user types it, with only the
environment a fresh login has: nothing a developer's home folder holds can
make it pass.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from carpool.orchestrator.runtime.local_ray import stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.ray]

CARPOOL = str(Path(sys.executable).with_name("carpool"))


def fresh_env(root: Path) -> dict[str, str]:
    home = root / "home"
    home.mkdir(exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "HOME": str(home), "XDG_STATE_HOME": str(home / ".local" / "state")}


def carpool(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([CARPOOL, *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"carpool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def ray_daemons() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("gcs_server", "raylet"):
            found.add(proc.pid)
    return found


def test_up_submit_fetch_down_with_an_empty_home_and_a_configured_state_dir(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    env = fresh_env(tmp_path)
    state = tmp_path / "configured-state"
    config = tmp_path / "operator.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "poll_interval_s": 0.05}))
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "first",
                "base_model": str(tiny_base),
                "dataset": {"path": str(datasets["text"])},
                "adapter": {"r": 4, "lora_alpha": 8},
                "training": {"max_steps": 3, "batch_size": 2, "save_steps": 2},
            }
        )
    )
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    up = carpool(env, "up", "--config", str(config), "--num-cpus", "2")
    cluster = json.loads((state / "cluster.json").read_text())
    try:
        assert f"created a Ray auth token in {token}" in up.stdout
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert "ray get-auth-token" in up.stdout  # how to sign in to the dashboard
        first_token = token.read_text()

        again = carpool(env, "up", "--config", str(config))
        assert "created" not in again.stdout and token.read_text() == first_token

        # No flag, no variable: every command finds the state directory `up` used.
        job_id = carpool(env, "submit", str(job)).stdout.strip()
        assert carpool(env, "wait", job_id, "--timeout", "180").stdout.split() == [
            job_id,
            "succeeded",
        ]
        assert job_id in carpool(env, "status").stdout
        assert any("succeeded" in line for line in carpool(env, "logs", job_id).stdout.splitlines())
        assert carpool(env, "cancel", job_id).stdout.split() == [job_id, "succeeded"]
        fetched = tmp_path / "adapter"
        carpool(env, "fetch", job_id, "--out", str(fetched))
        assert (fetched / "adapter_config.json").is_file()
        assert "carpool is down" in carpool(env, "down").stdout
        assert not (state / "cluster.json").exists()
        assert not any(p.is_running() for p in _cluster_processes(cluster["address"]))
    finally:
        if (state / "cluster.json").exists():
            stop_cluster(cluster["address"])


def _cluster_processes(address: str) -> list[psutil.Process]:
    from carpool.orchestrator.runtime.local_ray import cluster_processes

    return cluster_processes(address)


def test_a_failed_up_prints_rays_error_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    empty = tmp_path / "empty-token"
    empty.write_text("")  # Ray refuses an empty token file: `ray start` fails
    env["RAY_AUTH_TOKEN_PATH"] = str(empty)
    state = tmp_path / "state"
    before = ray_daemons()
    done = carpool(env, "up", "--state-dir", str(state), "--num-cpus", "1", check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "ray start failed" in done.stderr and "empty" in done.stderr  # Ray's own words
    assert not (state / "cluster.json").exists()
    assert ray_daemons() <= before
