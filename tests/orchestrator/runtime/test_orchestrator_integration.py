"""The control plane end to end on a local Ray cluster (CPU).

Each carpool is started with `Client.up` (the detached controller and worker actors on
the suite's shared `ray start` head, with token authentication) and stopped with
`Client.down`, which leaves that head running.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobState
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.training.training_history import read_log_history
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.cluster import (
    assert_same_adapter,
    carpool_cluster,
    engine_result,
    job,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("second-base"), seed=1)


def group_of(client: Client, job_id: str) -> str:
    started = [line for line in client.logs(job_id) if "in group" in line]
    return re.search(r"in group (\S+)", started[0]).group(1)


def test_jobs_queue_group_cancel_and_metrics(
    shared_ray_head: str,
    tiny_base: Path,
    second_base: Path,
    datasets: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CARPOOL_STATE_DIR", str(tmp_path / "state"))  # for the CLI calls
    specs = {
        "a": write_job(tmp_path / "a.yaml", "a", tiny_base, datasets["text"], 12),
        "b": write_job(
            tmp_path / "b.yaml",
            "b",
            tiny_base,
            datasets["messages"],
            8,
            eval_data=datasets["prompt_completion"],
            eval_steps=4,
        ),  # fmt: skip
        "c": write_job(tmp_path / "c.yaml", "c", second_base, datasets["prompt_completion"], 10),
        "long": write_job(tmp_path / "long.yaml", "long", tiny_base, datasets["text"], 400),
        "joiner": write_job(tmp_path / "join.yaml", "joiner", tiny_base, datasets["text"], 6),
        "doomed": write_job(tmp_path / "doomed.yaml", "doomed", tiny_base, datasets["text"], 4000),
    }
    with carpool_cluster(tmp_path, shared_ray_head) as client:
        # Three jobs on two bases: two groups, all succeed, each equal to the engine alone.
        ids = dict(zip("abc", client.submit([specs["a"], specs["b"], specs["c"]]), strict=True))
        assert client.wait(list(ids.values()), timeout=180) == dict.fromkeys(
            ids.values(), "succeeded"
        )
        assert group_of(client, ids["a"]) == group_of(client, ids["b"])
        assert group_of(client, ids["a"]) != group_of(client, ids["c"])
        for key, job_id in ids.items():
            out = client.fetch(job_id, tmp_path / "fetched" / key)
            assert_same_adapter(out, engine_result(specs[key]))
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        assert PeftModel.from_pretrained(base, tmp_path / "fetched" / "a") is not None
        # b's eval loss: in its status and its log, at steps 4 and 8.
        evaluated = job(client, ids["b"])["metrics"]
        assert evaluated["eval_step"] == 8 and evaluated["eval_loss"] > 0
        # And the figures HF's Trainer logs, as `carpool status --json` shows them.
        assert evaluated["learning_rate"] == 1e-2 and evaluated["grad_norm"] > 0
        assert evaluated["tokens_seen"] > 0
        assert sum("eval_loss" in line for line in client.logs(ids["b"])) == 2
        # b's history: in the queue, and beside its fetched adapter as trainer_state.json.
        history = client.history(ids["b"])
        assert [(e["step"], "eval_loss" in e) for e in history] == [
            (4, True),
            (8, False),
            (8, True),
        ]
        assert read_log_history(tmp_path / "fetched" / "b") == history
        # ...and on the Ray node's Prometheus endpoint, read while b's series is fresh:
        # Ray exports every few seconds, and a gauge no job updates any more may not
        # outlive the rest of this test.
        import ray

        node = next(n for n in ray.nodes() if n["Alive"])
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

        def metric_lines() -> list[str]:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            # Ray prefixes application metrics with "ray_".
            return [line for line in text.splitlines() if line.startswith("ray_carpool_")]

        b_eval = f'job="{ids["b"]}"'
        wait_for(
            lambda: any(x.startswith("ray_carpool_job_eval_loss") and b_eval in x
                        for x in metric_lines()),
            timeout=90, what="b's eval loss on /metrics",
        )  # fmt: skip

        # A job submitted while its base's group runs joins that group, no restart.
        long_id, doomed_id = client.submit([specs["long"], specs["doomed"]])
        wait_for(lambda: job(client, long_id)["step"] >= 5, what="long job running")
        group = group_of(client, long_id)

        actors_before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        # The dashboard's Actors page: classes a user understands, a repr saying what each is.
        from ray.util.state import list_actors

        shown = {
            a.class_name: a.repr_name
            for a in list_actors(
                # This cluster's, by address: other tests' heads come and go on this machine.
                address=shared_ray_head,
                filters=[("state", "=", "ALIVE")],
                detail=True,
            )
        }
        assert shown["CarpoolController"].startswith("CarpoolController(state_dir=")
        assert shown["CarpoolWorker"].startswith(f"CarpoolWorker(group={group}, base=")
        assert "rank=0/1" in shown["CarpoolWorker"]
        step_before = job(client, long_id)["step"]
        (joiner_id,) = client.submit([specs["joiner"]])
        assert client.wait([joiner_id], timeout=120) == {joiner_id: "succeeded"}
        assert group_of(client, joiner_id) == group
        capsys.readouterr()
        assert main(["logs", joiner_id, "--follow"]) == 0  # final already: prints, returns
        followed = capsys.readouterr().out.splitlines()
        assert followed == client.logs(joiner_id) and "succeeded" in followed[-1]
        assert client.logs(joiner_id, since=len(followed) - 1) == followed[-1:]
        actors_after = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert any(group in name for name in actors_before) and actors_before == actors_after
        assert job(client, long_id)["step"] > step_before  # it went on meanwhile

        assert main(["wait", long_id, "--timeout", "0.1"]) == 2  # still running

        # Cancel stops a running job before its next round; the others go on.
        # Several ids: one unknown id stops the command before any job is touched.
        assert main(["cancel", doomed_id, "no-such-job-0"]) == 1
        assert not job(client, doomed_id)["cancel_requested"]
        at_request = job(client, doomed_id)["step"]
        assert main(["cancel", doomed_id]) == 0
        wait_for(lambda: job(client, doomed_id)["state"] == "cancelled", what="cancel")
        assert main(["wait", doomed_id]) == 1
        # One round may have been in flight when the request arrived.
        assert job(client, doomed_id)["step"] <= at_request + 2
        assert client.wait([long_id], timeout=180) == {long_id: "succeeded"}
        assert job(client, long_id)["attempts"] == 1  # never restarted
        assert_same_adapter(client.fetch(long_id, tmp_path / "long"), engine_result(specs["long"]))

        # carpool's metrics reach the Ray node's Prometheus endpoint.
        def carpool_lines() -> list[str] | None:
            lines = metric_lines()
            # Exported every few seconds: wait for the long job's own series.
            wanted = f'job="{long_id}"'
            counted = any(
                x.startswith("ray_carpool_job_tokens_total") and wanted in x for x in lines
            )
            return lines if counted else None

        lines = wait_for(carpool_lines, timeout=90, what="the long job's metrics on /metrics")
        assert any(line.startswith("ray_carpool_queue_depth") for line in lines), lines
        for gauge in ("ray_carpool_job_learning_rate", "ray_carpool_job_grad_norm"):
            assert any(x.startswith(gauge) and f'job="{long_id}"' in x for x in lines), gauge


def test_priority_preemption_and_durability(
    shared_ray_head: str, tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    low = write_job(tmp_path / "low.yaml", "low", tiny_base, datasets["text"], 300)
    high = write_job(tmp_path / "high.yaml", "high", tiny_base, datasets["messages"], 10, 5)
    waiting = write_job(tmp_path / "waiting.yaml", "waiting", tiny_base, datasets["text"], 20)
    # Room for exactly one job: one group of one adapter.
    # The controller restarts (down, up); Ray, the suite's shared head, stays.
    with carpool_cluster(
        tmp_path, shared_ray_head, max_groups=1, max_adapters_per_group=1
    ) as client:
        (low_id,) = client.submit([low])
        wait_for(lambda: job(client, low_id)["step"] >= 30, what="low running")
        (high_id,) = client.submit([high])
        assert client.wait([high_id], timeout=120) == {high_id: "succeeded"}
        assert any("preempted" in line for line in client.logs(low_id))
        assert client.wait([low_id], timeout=180) == {low_id: "succeeded"}
        assert job(client, low_id)["attempts"] == 2
        assert job(client, low_id)["metrics"]["preemptions"] == 1
        # Resumed from its checkpoint, it ends where an uninterrupted run ends.
        uninterrupted = engine_result(low)
        assert_same_adapter(client.fetch(low_id, tmp_path / "low"), uninterrupted)
        # Its success recorded, it needs no checkpoint any more.
        checkpoints = tmp_path / "state" / "artifacts" / "checkpoints"
        assert not (checkpoints / low_id).exists()

        # Durability: down and up keep the queue and the artifacts.
        again_id, waiting_id = client.submit([low, waiting])
        wait_for(lambda: job(client, again_id)["step"] >= 5, what="second low running")
        client.down()
        with JobQueue(tmp_path / "state" / "queue.sqlite") as queue:
            assert queue.get(waiting_id).state is JobState.QUEUED
            assert queue.get(again_id).state is JobState.QUEUED  # checkpointed by down
            assert queue.get(again_id).checkpoint is not None
        client = Client.up(tmp_path / "operator.yaml", address=shared_ray_head)
        assert client.fetch(high_id, tmp_path / "high-after-restart").is_dir()
        assert client.wait([again_id, waiting_id], timeout=180) == {
            again_id: "succeeded",
            waiting_id: "succeeded",
        }
        assert_same_adapter(client.fetch(again_id, tmp_path / "again"), uninterrupted)
        assert not (checkpoints / again_id).exists()
