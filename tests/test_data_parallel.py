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
from carpool.orchestrator.local_ray import free_port
from carpool.workers.data_parallel import DataParallel
from carpool.workers.engine import Engine
from carpool.workers.job_config import AdapterConfig, DatasetConfig, JobConfig, TrainingConfig
from carpool.workers.rounds import run_round

from tests.peft_reference import max_relative_difference
from tests.round_driver import KeepFinished

pytestmark = pytest.mark.integration


def group_jobs(base: Path, datasets: dict[str, Path]) -> list[JobConfig]:
    def job(name, data, adapter, eval_data=None, **training) -> JobConfig:
        t = {"learning_rate": 1e-2, "shuffle": True, "seed": 5, **training}
        evaluate = DatasetConfig(eval_data) if eval_data else None
        return JobConfig(
            name, str(base), DatasetConfig(data), adapter, TrainingConfig(**t),
            eval_dataset=evaluate,
        )  # fmt: skip

    return [
        # An odd batch: the ranks get 3 and 2 rows.
        # Evaluated every 2 steps on rows the ranks split between them.
        job("odd", datasets["text"], AdapterConfig(r=4, target_modules="all-linear"),
            datasets["prompt_completion"], max_steps=6, batch_size=5, max_grad_norm=0.5,
            eval_steps=2),
        # One row per step, one eval row: rank 1 never has a row of this job.
        job("single", datasets["messages"], AdapterConfig(r=2, lora_dropout=0.1),
            datasets["one_row"], max_steps=4, batch_size=1, lr_scheduler_type="cosine"),
        job("lorafa", datasets["prompt_completion"],
            AdapterConfig(r=8, target_modules=("q_proj", "down_proj"), freeze_lora_A=True),
            max_steps=5, batch_size=4),
    ]  # fmt: skip


def step_losses(engine: Engine, finished: KeepFinished) -> dict[str, float]:
    """One round's training losses, and eval losses as "<job>:eval"."""
    out = {}
    for result in run_round(engine, finished):
        out[result.job] = result.loss
        if result.eval_loss is not None:
            out[f"{result.job}:eval"] = result.eval_loss
    return out


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
