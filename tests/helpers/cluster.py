"""A carpool cluster on local Ray for integration tests, job files for it, and its checks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.spec_check.validation import load_spec_file
from carpool.workers.peft_files.peft_format import read_adapter
from carpool.workers.training.engine import Engine

from tests.helpers.round_driver import train_to_end


@contextmanager
def carpool_cluster(root: Path, ray_address: str | None = None, **operator) -> Iterator[Client]:
    """A controller with its own state directory and operator settings under `root`.

    On `ray_address` (the suite's shared head) it attaches, and `down` leaves that Ray
    running; without one, `up` starts a head of its own and `down` stops it.
    """
    config = {"state_dir": str(root / "state"), "poll_interval_s": 0.05, **operator}
    config_path = root / "operator.yaml"
    config_path.write_text(yaml.safe_dump(config))
    client = Client.up(config_path, address=ray_address, num_cpus=2)
    try:
        yield client
    finally:
        client.down()


def write_job(
    path: Path,
    name: str,
    base: Path,
    data: Path,
    steps: int,
    priority: int = 0,
    eval_data: Path | None = None,
    **training,
) -> Path:
    spec = {
        "name": name,
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": steps,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "shuffle": True,
            "seed": 1,
            "save_steps": 25,
            **training,
        },
        "priority": priority,
    }
    if eval_data is not None:
        spec["eval_dataset"] = {"path": str(eval_data)}
    path.write_text(yaml.safe_dump(spec))
    return path


def engine_result(spec_path: Path) -> dict[str, torch.Tensor]:
    """The same spec trained by the engine alone, in this process: the reference."""
    return engine_results([spec_path])[0]


def engine_results(
    spec_paths: list[Path], threads: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The specs trained together, uninterrupted, by one engine in this process.

    `threads` matches a worker's torch threads, so matmuls sum in the same order.
    """
    configs = [load_spec_file(p) for p in spec_paths]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        engine = Engine(
            configs[0].base_model, device="cpu", quantization=configs[0].base_quantization
        )
        for config in configs:
            engine.add_job(config)
        finished = train_to_end(engine)
    finally:
        torch.set_num_threads(previous)
    return [finished[c.name].adapter.named_tensors() for c in configs]


def assert_same_adapter(
    fetched: Path, expected: dict[str, torch.Tensor], tolerance: float = 1e-4
) -> None:
    loaded = read_adapter(fetched)
    got = {}
    for module, (a, b) in loaded.weights.items():
        got[f"{module}.lora_A"], got[f"{module}.lora_B"] = a, b
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        scale = tensor.abs().max().clamp_min(1e-12)
        assert float((got[key] - tensor).abs().max() / scale) <= tolerance, key


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def job(client: Client, job_id: str) -> dict:
    return client.status(job_id)[0]
