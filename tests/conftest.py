"""Shared fixtures: a tiny base model and small datasets, made locally."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from carpool.workers.base.tiny_base import build_tiny_base

from tests.helpers.data import write_jsonl


def pytest_configure(config: pytest.Config) -> None:
    """Under `make test`'s two workers each worker computes on one thread: two tests then
    use the two cores instead of four threads contending for them (Ray's actors and the
    processes tests start choose their own threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test` runs two workers: the tests on Ray in one lane, the rest beside them."""
    from tests.helpers.xdist_lanes import RayTestsInOneLane

    return RayTestsInOneLane(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on Ray outside the Ray lane's files would start a second head beside the
    lane's, on the same cores: refused before anything runs."""
    from tests.helpers.xdist_lanes import RAY_LANE, lane_of

    astray = [
        item.nodeid
        for item in items
        if ("shared_ray_head" in item.fixturenames or item.get_closest_marker("ray"))
        and lane_of(item.nodeid) != RAY_LANE
    ]
    if astray:
        raise pytest.UsageError(
            "tests on Ray outside tests/helpers/xdist_lanes.py's RAY_FILES: " + ", ".join(astray)
        )


@pytest.fixture(scope="session", autouse=True)
def own_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What carpool keeps per user goes to folders of the tests' own, which every process
    they start inherits: the state directory `carpool up` records (under
    $XDG_STATE_HOME) and what validation keeps of a base (`base_facts`)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
        env.setenv("CARPOOL_CACHE_DIR", str(tmp_path_factory.mktemp("carpool-cache")))
        yield


@pytest.fixture(params=["loop", "bmm", "grouped_mm"])
def adapter_math(request: pytest.FixtureRequest) -> str:
    """Each way the bank computes LoRA terms: the reference loop and the grouped paths.
    A test that takes this runs once per path, against the same bars."""
    return request.param


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-shaped model (hidden 64) and its tokenizer, saved to disk."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small datasets, one per format (preference pairs and unpaired too), with rows of
    varied length."""
    root = tmp_path_factory.mktemp("data")
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "looked",
        "at",
        "the",
        "quick",
        "brown",
        "fox",
    ]
    text = [{"text": " ".join(words[: 3 + (i * 7) % 11]) + f" {i}"} for i in range(40)]
    pc = [
        {"prompt": f"Question: what is {i} plus {i % 5}?", "completion": f" Answer: {i + i % 5}."}
        for i in range(40)
    ]
    pairs = [
        {
            "prompt": " ".join(words[: 2 + i % 5]) + f" {i}",
            "chosen": " " + " ".join(words[i % 7 : i % 7 + 1 + i % 3]),
            "rejected": " " + " ".join(reversed(words[: 1 + (i * 3) % 6])) + " no",
        }
        for i in range(12)
    ]
    msgs = [
        {
            "messages": [
                {"role": "user", "content": f"say hello {i}"},
                {"role": "assistant", "content": "hello " * (1 + i % 4)},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": f"hello {i}"},
            ]
        }
        for i in range(40)
    ]
    return {
        "text": write_jsonl(root / "text.jsonl", text),
        "prompt_completion": write_jsonl(root / "pc.jsonl", pc),
        "messages": write_jsonl(root / "msgs.jsonl", msgs),
        # A one-row eval set: in a group of two ranks, one of them has no row of it.
        "one_row": write_jsonl(root / "one.jsonl", [{"text": "the quick brown fox"}]),
        "preference": write_jsonl(root / "pairs.jsonl", pairs),
        # The pairs unpaired, as TRL unpairs them, a record per completion; labelled so that
        # the longer completions are the desirable ones, which lifts KTO's KL estimate off 0.
        "unpaired": write_jsonl(
            root / "unpaired.jsonl",
            [
                {"prompt": p["prompt"], "completion": p[side], "label": side == "rejected"}
                for p in pairs
                for side in ("chosen", "rejected")
            ],
        ),
    }


METRICS_INTERVAL = "RAY_metrics_report_interval_ms"


@pytest.fixture(scope="session")
def shared_ray_head() -> Iterator[str]:
    """One Ray head (2 CPUs) for the integration tests that neither kill, restart nor
    reconfigure Ray: each starts its own controller and state directory on it, and its
    `down` leaves the head running. `ray start` costs about 11 s; the head stops (only
    it) when the session ends."""
    from carpool.orchestrator.runtime.local_ray import start_head, stop_cluster

    # Metrics every 2 s instead of 10: the tests that read /metrics wait less.
    previous = os.environ.get(METRICS_INTERVAL)
    os.environ[METRICS_INTERVAL] = "2000"
    try:
        head = start_head(num_cpus=2)
    finally:
        if previous is None:
            del os.environ[METRICS_INTERVAL]
        else:
            os.environ[METRICS_INTERVAL] = previous
    try:
        yield head.address
    finally:
        stop_cluster(head.address)
