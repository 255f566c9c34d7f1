"""Worker-group throughput: group_size 1 against 2, side by side (CPU, gloo).

The same K jobs run in a group of one rank and in a group of two ranks (each
job's step rows dealt across the ranks, adapter gradients all-reduced), each
rank one process with one torch thread. Prints tokens/s of each and the ratio;
on a 2-core machine this is a plumbing check, not a scaling claim.

    python benchmarks/groups.py [--jobs 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.data.dataset import TokenizedDataset, TokenizedRow
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from carpool.workers.training.engine import Engine

SEQ, ROWS_PER_JOB = 128, 8


def jobs(base: Path, k: int) -> list[JobSpec]:
    # The engine is handed each job's rows: the dataset path is only a name.
    return [
        JobSpec(
            name=f"job{i}",
            base_model=str(base),
            dataset=DatasetSpec(path=Path(f"synthetic-{i}.jsonl")),
            adapter=AdapterSpec(r=16, lora_alpha=32, target_modules="all-linear"),
            training=TrainingSpec(max_steps=10_000, batch_size=ROWS_PER_JOB, shuffle=False, seed=i),
        )  # fmt: skip
        for i in range(k)
    ]


def dataset(seed: int, vocab: int) -> TokenizedDataset:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(3, vocab, (ROWS_PER_JOB * 2, SEQ), generator=gen).tolist()
    rows = tuple(TokenizedRow(tuple(r), tuple(r)) for r in data)
    return TokenizedDataset(rows, "text", 0, Path(f"synthetic-{seed}"))


def _rank(rank: int, world: int, port: int, base: Path, k: int, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    dp = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        dp = DataParallel()
    engine = Engine(str(base), device="cpu", data_parallel=dp)
    vocab = engine.base.config.vocab_size
    for i, config in enumerate(jobs(base, k)):
        engine.add_job(config, dataset=dataset(i, vocab))
    engine.train_round()  # warm-up
    if dp:
        dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        engine.train_round()
    seconds = time.perf_counter() - started
    if rank == 0:
        (out / f"world{world}.txt").write_text(str(seconds))
    if dp:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    tokens = args.jobs * ROWS_PER_JOB * SEQ * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(
            root / "base", hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
            num_kv_heads=4,
        )  # fmt: skip
        results = {}
        for world in (1, 2):
            spawn_args = (world, free_port(), base, args.jobs, args.steps, root)
            mp.spawn(_rank, args=spawn_args, nprocs=world, join=True)
            results[world] = tokens / float((root / f"world{world}.txt").read_text())
    print(
        f"jobs={args.jobs} rows/job/step={ROWS_PER_JOB} seq={SEQ} r=16 all-linear "
        f"steps={args.steps}; one torch thread per rank (CPU, gloo)"
    )
    for world, tps in results.items():
        print(f"group_size={world}: {tps:,.0f} tokens/s")
    print(f"group_size 2 / group_size 1: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
