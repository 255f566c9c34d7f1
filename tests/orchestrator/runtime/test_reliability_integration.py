"""Crashes: a rank or the controller killed with SIGKILL mid-training loses nothing."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster import (
    assert_same_adapter,
    carpool_cluster,
    engine_result,
    engine_results,
    job,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.integration


def worker_pids() -> dict[str, int]:
    import ray
    from carpool.orchestrator.runtime.actor_names import NAMESPACE

    pids = {}
    for info in ray.util.list_named_actors(all_namespaces=True):
        if re.search(r"-rank-\d+$", info["name"]):
            try:
                actor = ray.get_actor(info["name"], namespace=NAMESPACE)
                pids[info["name"]] = ray.get(actor.pid.remote(), timeout=10)
            except Exception:  # dead, or going: not a live rank
                continue
    return pids


def test_killed_worker_and_controller_resume_from_checkpoints(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    a = write_job(tmp_path / "a.yaml", "a", tiny_base, datasets["text"], 120, save_steps=10)
    b = write_job(tmp_path / "b.yaml", "b", tiny_base, datasets["messages"], 100, save_steps=10)
    # Kills actor processes (a rank, the controller), not Ray: the shared head serves.
    with carpool_cluster(tmp_path, shared_ray_head) as client:
        a_id, b_id = client.submit([a, b])
        wait_for(lambda: job(client, a_id)["checkpoint_step"] >= 20, what="a checkpoint")

        # A rank dies: its group's jobs go back to the queue and resume from checkpoints.
        pids = worker_pids()
        assert pids
        step_at_kill = job(client, a_id)["step"]
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        resumed = wait_for(
            lambda: [line for line in client.logs(a_id) if "resumed from step" in line],
            timeout=90, what="job a resumed in a new group",
        )  # fmt: skip
        assert not set(worker_pids().values()) & set(pids.values())  # new processes
        lost = step_at_kill - int(re.search(r"resumed from step (\d+)", resumed[-1]).group(1))
        assert 0 <= lost <= 10 + 1  # at most save_steps (plus the round in flight)

        # The controller dies: Ray restarts it; the queue is as it was and jobs resume.
        import ray

        controller_pid = ray.get(client.controller.ping.remote())["pid"]
        os.kill(controller_pid, signal.SIGKILL)
        wait_for(
            lambda: _pid_or_none(client) not in (None, controller_pid), timeout=90,
            what="the controller to restart",
        )  # fmt: skip
        assert client.wait([a_id, b_id], timeout=240) == {a_id: "succeeded", b_id: "succeeded"}
        # The reference: both jobs fused in one uninterrupted run, with the worker's
        # one torch thread (cpus_per_rank=1), so even float rounding matches.
        references = engine_results([a, b], threads=1)
        for spec, job_id, reference in [(a, a_id, references[0]), (b, b_id, references[1])]:
            fetched = client.fetch(job_id, tmp_path / spec.stem)
            assert_same_adapter(fetched, reference, tolerance=1e-6)
            # Finished exactly once, whatever was restarted on the way.
            assert sum("succeeded" in line for line in client.logs(job_id)) == 1


def _pid_or_none(client) -> int | None:
    import ray

    try:
        return ray.get(client.controller.ping.remote(), timeout=5)["pid"]
    except Exception:
        return None


def test_a_diverging_job_fails_alone_through_the_queue(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    good = write_job(tmp_path / "good.yaml", "good", tiny_base, datasets["text"], 30)
    bad = write_job(
        tmp_path / "bad.yaml", "bad", tiny_base, datasets["messages"], 30, learning_rate=1e30
    )
    spec = yaml.safe_load(bad.read_text())
    spec["adapter"]["target_modules"] = "all-linear"  # so the blow-up reaches the loss
    bad.write_text(yaml.safe_dump(spec))
    with carpool_cluster(tmp_path, shared_ray_head) as client:
        good_id, bad_id = client.submit([good, bad])
        assert client.wait([good_id, bad_id], timeout=180) == {
            good_id: "succeeded",
            bad_id: "failed",
        }
        record = job(client, bad_id)
        assert record["attempts"] == 1  # its own fault: never retried
        assert "loss is" in record["error"] or "non-finite" in record["error"]
        # Its neighbour trained as if it had been alone.
        assert_same_adapter(client.fetch(good_id, tmp_path / "good"), engine_result(good))
