"""Load: 8 client processes submitting 200 jobs at once; none lost, all finish."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tests.helpers.cluster import carpool_cluster, write_job

pytestmark = pytest.mark.integration

CLIENTS, JOBS_PER_CLIENT = 8, 25


def _submit_many(state_dir: str, spec: str, count: int, out) -> None:
    os.environ["CARPOOL_STATE_DIR"] = state_dir
    from carpool.orchestrator.runtime.client import Client

    client = Client()
    out.put([client.submit([spec])[0] for _ in range(count)])


def test_concurrent_clients_lose_no_job(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    spec = write_job(tmp_path / "tiny.yaml", "tiny", tiny_base, datasets["text"], 1, batch_size=1)
    with carpool_cluster(tmp_path, shared_ray_head, max_adapters_per_group=64) as client:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        state_dir = str(tmp_path / "state")
        clients = [
            context.Process(
                target=_submit_many, args=(state_dir, str(spec), JOBS_PER_CLIENT, results)
            )
            for _ in range(CLIENTS)
        ]
        for process in clients:
            process.start()
        ids = [job_id for _ in clients for job_id in results.get(timeout=300)]
        for process in clients:
            process.join(timeout=60)
            assert process.exitcode == 0
        assert len(ids) == CLIENTS * JOBS_PER_CLIENT == len(set(ids))
        records = {r["id"]: r for r in client.status()}
        assert set(ids) <= set(records)  # every id the clients got is in the queue
        states = client.wait(ids, timeout=600)
        assert set(states.values()) == {"succeeded"}
