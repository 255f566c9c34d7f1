"""Worker groups of two ranks through the whole control plane (Ray, gloo, CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.runtime import local_ray
from carpool.orchestrator.runtime.client import Client

from tests.helpers.cluster import (
    assert_same_adapter,
    carpool_cluster,
    engine_result,
    job,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.integration


def two_rank_jobs(tmp_path: Path, base: Path, datasets: dict[str, Path]) -> list[Path]:
    return [
        # Odd: the ranks get 3 and 2 of its rows each step.
        write_job(tmp_path / "odd.yaml", "odd", base, datasets["text"], 6, batch_size=5),
        # One row a step: rank 1 never has a row of this job.
        write_job(tmp_path / "one.yaml", "one", base, datasets["messages"], 5, batch_size=1),
    ]


def test_group_of_two_ranks_equals_one_rank(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Join, cancel and preemption in a group of two ranks; every adapter == one rank's."""
    odd, one = two_rank_jobs(tmp_path, tiny_base, datasets)
    low = write_job(tmp_path / "low.yaml", "low", tiny_base, datasets["text"], 600)
    doomed = write_job(tmp_path / "doomed.yaml", "doomed", tiny_base, datasets["text"], 5000)
    # One group of two ranks with room for two jobs.
    with carpool_cluster(
        tmp_path, shared_ray_head, group_size=2, max_groups=1, max_adapters_per_group=2
    ) as client:
        import ray

        def rank_actors() -> set[str]:
            names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            return {n for n in names if re.search(r"-rank-\d+$", n)}

        low_id, doomed_id = client.submit([low, doomed])

        def both_ranks() -> set[str] | None:
            """The ranks register one by one: the group's full set, not the first to appear."""
            found = rank_actors()
            return found if len(found) == 2 else None

        ranks = wait_for(both_ranks, what="both of the group's rank actors")
        assert {n.rsplit("-", 1)[1] for n in ranks} == {"0", "1"}
        wait_for(lambda: job(client, doomed_id)["step"] >= 3, what="doomed running")
        client.cancel(doomed_id)
        wait_for(lambda: job(client, doomed_id)["state"] == "cancelled", what="cancel")
        # Two higher-priority jobs at once: one takes the freed place (joining the
        # running group), the other preempts the low-priority job.
        assert job(client, low_id)["state"] == "running"
        odd_id, one_id = client.submit([with_priority(odd, 5), with_priority(one, 5)])
        wait_for(lambda: job(client, one_id)["state"] != "queued", what="both admitted")
        assert rank_actors() == ranks  # same actors: no reload, no restart
        ids = [low_id, odd_id, one_id]
        assert client.wait(ids, timeout=300) == dict.fromkeys(ids, "succeeded")
        assert any("preempted" in line for line in client.logs(low_id))
        for spec, job_id in [(low, low_id), (odd, odd_id), (one, one_id)]:
            assert_same_adapter(client.fetch(job_id, tmp_path / spec.stem), engine_result(spec))
        wait_for(lambda: not rank_actors(), what="the idle group to stop")


def with_priority(spec: Path, priority: int) -> Path:
    data = yaml.safe_load(spec.read_text())
    data["priority"] = priority
    out = spec.with_name(f"{spec.stem}-p{priority}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def ray_cli(*args: str) -> str:
    done = subprocess.run(
        [local_ray.ray_cli(), *args], capture_output=True, text=True, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.ray  # nodes of its own
def test_group_spanning_two_ray_nodes(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Two `ray start` nodes, each with a resource only it has: the ranks must span both."""
    out = ray_cli(
        "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
        "--disable-usage-stats", "--resources", json.dumps({"node_a": 1}),
    )  # fmt: skip
    address = re.search(r"ray start --address='([^']+)'", out).group(1)
    try:
        ray_cli(
            "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats",
            "--resources", json.dumps({"node_b": 1}),
        )  # fmt: skip
        config = {
            "state_dir": str(tmp_path / "state"),
            "poll_interval_s": 0.05,
            "group_size": 2,
            "rank_resources": [{"node_a": 1}, {"node_b": 1}],
        }
        (tmp_path / "operator.yaml").write_text(yaml.safe_dump(config))
        client = Client.up(tmp_path / "operator.yaml", address=address)
        try:
            import ray

            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            specs = two_rank_jobs(tmp_path, tiny_base, datasets)
            ids = client.submit(specs)
            assert client.wait(ids, timeout=240) == dict.fromkeys(ids, "succeeded")
            for spec, job_id in zip(specs, ids, strict=True):
                fetched = client.fetch(job_id, tmp_path / spec.stem)
                assert_same_adapter(fetched, engine_result(spec))
        finally:
            client.down()
    finally:
        local_ray.stop_cluster(address)  # both nodes: each names this GCS address


def test_zero3_group_through_the_control_plane(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """`zero_stage: 3` in the operator config: the base is partitioned across the two
    ranks (DeepSpeed ZeRO-3), and the adapters equal one rank's replicated run."""
    specs = two_rank_jobs(tmp_path, tiny_base, datasets)
    with carpool_cluster(tmp_path, shared_ray_head, group_size=2, zero_stage=3) as client:
        ids = client.submit(specs)
        assert client.wait(ids, timeout=300) == dict.fromkeys(ids, "succeeded")
        for spec, job_id in zip(specs, ids, strict=True):
            assert_same_adapter(client.fetch(job_id, tmp_path / spec.stem), engine_result(spec))
        # Both ranks said so when they loaded the base (their lines in Ray's worker logs).
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*"))
        for rank in (0, 1):
            assert f"rank {rank}/2: zero_stage=3" in text


@pytest.fixture
def ray_driver(shared_ray_head: str):
    """This process attached to the suite's Ray head for the test (if it was not already)."""
    import logging

    import ray

    attached_here = not ray.is_initialized()
    if attached_here:
        ray.init(address=shared_ray_head, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    if attached_here:
        ray.shutdown()


def test_a_rank_lost_while_its_peer_waits_fails_the_group_at_once(ray_driver) -> None:
    """Seen as a hung suite: rank 0 of a group could not listen on its rendezvous port
    (another process took it first) and died in __init__, while rank 1 waited for it in
    the rendezvous; the admission then asked rank 1 to remove the job, which it never
    answered. The group fails at once (the controller shuts it down and requeues its
    jobs), without a call to the waiting rank."""
    from carpool.orchestrator.control.controller import GroupFailedError
    from carpool.orchestrator.runtime.ray_runtime import CarpoolWorker, RayWorkerGroup

    @ray_driver.remote(num_cpus=0)
    class Rank:
        def __init__(self, rank: int) -> None:
            if rank == 0:
                raise OSError("EADDRINUSE: address already in use")
            time.sleep(60)  # in the rendezvous, waiting for rank 0

        def add_job(self, *args) -> None:
            pass

        def remove_job(self, *args) -> None:
            pass

    group = RayWorkerGroup.__new__(RayWorkerGroup)  # its ranks without a placement group
    group.group_id, group.actors = "g-test", [Rank.remote(0), Rank.remote(1)]
    with pytest.raises(GroupFailedError, match="address already in use"):
        group.add_job("job-a", None, None)
    waiting = group.actors[1].add_job.remote()
    assert ray_driver.wait([waiting], timeout=2)[1] == [waiting]  # still in its __init__
    for actor in group.actors:
        ray_driver.kill(actor)

    # Ray takes the repr of a rank whose __init__ failed to report it: it must not raise.
    assert "not started" in repr(CarpoolWorker.__new__(CarpoolWorker))
