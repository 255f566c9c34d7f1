"""Train the same jobs on two gloo ranks and on one, in float64, to compare the adapters.

`dtype` and `quantization` change the engines' dtype and base (a 4-bit base computes in
its `bnb_4bit_compute_dtype`: pass that dtype with it).

`prepare` (module-level, so spawn can pickle it) runs on each engine after the
jobs are added, e.g. to move weights off their zero start the same way on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.engine import Engine

from tests.helpers.round_driver import train_to_end

Prepare = Callable[[Engine], object] | None
Tensors = dict[str, dict[str, torch.Tensor]]


def _trained(engine: Engine, configs: list[JobSpec], prepare: Prepare) -> Tensors:
    for config in configs:
        engine.add_job(config)
    if prepare is not None:
        prepare(engine)
    return {n: j.adapter.named_tensors() for n, j in train_to_end(engine).items()}


def _rank(
    rank: int,
    port: int,
    base: Path,
    configs: list[JobSpec],
    out: Path,
    prepare: Prepare,
    dtype: torch.dtype,
    quantization: QuantizationSpec | None,
):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        engine = Engine(
            str(base),
            device="cpu",
            dtype=dtype,
            quantization=quantization,
            data_parallel=DataParallel(),
        )
        torch.save(_trained(engine, configs, prepare), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_on_two_ranks(
    base: Path,
    configs: list[JobSpec],
    out: Path,
    prepare: Prepare = None,
    dtype: torch.dtype = torch.float64,
    quantization: QuantizationSpec | None = None,
) -> list[Tensors]:
    """Each rank's finished adapters, by job name."""
    args = (free_port(), base, configs, out, prepare, dtype, quantization)
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def train_on_one_rank(
    base: Path,
    configs: list[JobSpec],
    prepare: Prepare = None,
    dtype: torch.dtype = torch.float64,
    quantization: QuantizationSpec | None = None,
) -> Tensors:
    engine = Engine(str(base), device="cpu", dtype=dtype, quantization=quantization)
    return _trained(engine, configs, prepare)
