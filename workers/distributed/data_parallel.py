"""Data parallelism across the ranks of a worker group: adapter gradients only.

Every rank holds the same jobs, the same (frozen) base and the same adapters.
Each job's step rows are dealt out across ranks; each rank computes its share
with the job's loss normalized over the *whole* step, so summing the ranks'
gradients gives exactly the single-rank gradient. Only adapter gradients (and
the per-job loss figures) cross the wire; the base is never communicated.

Every rank issues the same collectives in the same order each round, whether
or not it had rows of a job: a rank with none contributes zeros.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from carpool.workers.data.fused_batch import StepRow, planning_units
from carpool.workers.variants.job_adapter import JobAdapter


class DataParallel:
    def __init__(
        self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
    ) -> None:
        """`device` holds the small tensors of loss figures (NCCL needs them on the GPU)."""
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Bytes this rank sent into each kind of collective, counted at the call.
        self.collective_bytes: dict[str, int] = defaultdict(int)

    def shard(self, rows: Sequence[StepRow]) -> list[StepRow]:
        """This rank's share: of each job's units (a row, or a pair's two rows), every
        world_size-th from `rank`."""
        by_job: dict[str, list[StepRow]] = defaultdict(list)
        for row in rows:
            by_job[row.job].append(row)
        return [
            r
            for job_rows in by_job.values()
            for unit in planning_units(job_rows)[self.rank :: self.world_size]
            for r in unit
        ]

    def _all_reduce(self, tensor: torch.Tensor, kind: str) -> None:
        self.collective_bytes[kind] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_gradients(self, adapters: Sequence[JobAdapter]) -> None:
        """Sum the due jobs' adapter gradients over ranks: one flat all-reduce.

        Adapters must come in the same order on every rank (the engine sorts by job).
        """
        params = [p for a in adapters for p in a.parameters() if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._all_reduce(flat, "adapter_gradients")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def reduce_losses(self, names: Sequence[str], losses: dict[str, float]) -> dict[str, float]:
        """Sum each job's partial loss over ranks (a few floats, for reporting)."""
        values = torch.tensor(
            [losses.get(n, 0.0) for n in names], dtype=torch.float64, device=self.device
        )
        self._all_reduce(values, "losses")
        return dict(zip(names, values.tolist(), strict=True))


def reduce_metric_sums(
    dp: DataParallel, sums: dict[str, dict[str, float]], names: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Each job's metric sums added over ranks. Every rank passes the same jobs and each
    job's metric `names` (a rank without rows of a job contributes zeros), so the
    collective matches."""
    pairs = [(job, name) for job in sorted(sums) for name in names[job]]
    keys = [f"{job}\t{name}" for job, name in pairs]
    local = {f"{job}\t{name}": sums[job].get(name, 0.0) for job, name in pairs}
    total = dp.reduce_losses(keys, local)
    return {job: {name: total[f"{job}\t{name}"] for name in names[job]} for job in sums}
