"""A group of two ranks (gloo, CPU) trains exactly what one rank trains.

Only adapter gradients are all-reduced, and every rank issues the same
collectives even in steps where it has no rows of some job.

Runs in float64: splitting a step across ranks changes summation order, and in
float32 AdamW's first steps on a zero-initialised B magnify that rounding to
~1e-4 of the weights. In float64 the same comparison must hold to 1e-9, which
shows the two computations are the same math.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import group_jobs, step_losses
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import KeepFinished

pytestmark = pytest.mark.integration


def _rank(rank: int, world: int, port: int, base: Path, datasets: dict, out: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        dp = DataParallel()
        engine = Engine(str(base), device="cpu", dtype=torch.float64, data_parallel=dp)
        for config in group_jobs(base, datasets):
            engine.add_job(config)
        losses, finished = [], KeepFinished()
        while engine.active_jobs():
            losses.append(step_losses(engine, finished))
        adapters = {n: j.adapter.named_tensors() for n, j in finished.jobs.items()}
        torch.save(
            {"adapters": adapters, "bytes": dict(dp.collective_bytes), "losses": losses},
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_and_reduce_only_adapter_gradients(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    mp.spawn(_rank, args=(2, free_port(), tiny_base, datasets, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = Engine(str(tiny_base), device="cpu", dtype=torch.float64)
    configs = group_jobs(tiny_base, datasets)
    for config in configs:
        single.add_job(config)
    single_losses, finished = [], KeepFinished()
    while single.active_jobs():
        single_losses.append(step_losses(single, finished))
    assert sum("odd:eval" in s for s in single_losses) == 3  # steps 2, 4, 6
    assert sum("single:eval" in s for s in single_losses) == 1  # at the end

    for config in configs:
        expected = finished.jobs[config.name].adapter.named_tensors()
        assert max_relative_difference(expected, ranks[0]["adapters"][config.name]) <= 1e-9
        # Replicas stay identical: the same reduced gradients, the same AdamW steps.
        for key, tensor in ranks[0]["adapters"][config.name].items():
            assert torch.equal(tensor, ranks[1]["adapters"][config.name][key]), key
    for got, want in zip(ranks[0]["losses"], single_losses, strict=True):
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= 1e-9 * max(1.0, abs(want[k])) for k in want)

    # Bytes into the gradient all-reduce: exactly the due jobs' trainable adapter bytes.
    trainable = {
        name: sum(p.numel() * p.element_size() for p in job.adapter.parameters() if p.requires_grad)
        for name, job in finished.jobs.items()
    }
    steps = {c.name: c.training.max_steps for c in configs}
    expected_bytes = sum(
        trainable[name] for k in range(max(steps.values())) for name in steps if steps[name] > k
    )
    base_bytes = sum(p.numel() * p.element_size() for p in single.base.parameters())
    for rank in ranks:
        assert rank["bytes"]["adapter_gradients"] == expected_bytes
        assert set(rank["bytes"]) == {"adapter_gradients", "losses"}
        assert rank["bytes"]["losses"] < 1024  # a few floats per round
        assert expected_bytes < base_bytes  # and nothing of the base's size went out
