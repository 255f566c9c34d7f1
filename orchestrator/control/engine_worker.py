"""The worker behind one rank of a group: an engine plus the artifact store.

A plain class: `ray_runtime` wraps it in a Ray actor, tests drive it directly.
Jobs are keyed by job id inside the engine (names may repeat across
submissions; ids do not). Rounds are `carpool.workers.training.rounds.run_round`, the
same as `carpool train`'s; checkpoints and finished adapters go to the store
(`StoreOutputs`): written in place when the store is a local directory,
written to scratch and uploaded when it is a URI.

In a group of several ranks, every rank gets every call (same jobs, same
rounds, so the same collectives); rank 0, the leader, alone writes checkpoints
and adapters and reports results. The adapters are replicas, so its copy is
everyone's.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from carpool.orchestrator.store.artifact_store import ArtifactStore
from carpool.workers.base.base_model import default_dtype
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.distributed.zero3 import base_parameter_bytes, choose_zero_stage
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.checkpoint import save_checkpoint
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import (
    JobOutputs,
    JobRoundResult,
    export_job,
    finish_job,
    run_round,
)
from carpool.workers.training.training_job import TrainingJob

log = logging.getLogger("carpool.worker")
T = TypeVar("T")


@dataclass(frozen=True)
class JobAdmitted:
    """What admitting a job reports back: the step it starts at, and notes for its log."""

    step: int
    notices: tuple[str, ...] = ()
    # Resumed from its final checkpoint: no round would ever report it, so it
    # was exported and removed at once (the store URI of its adapter, from the leader).
    adapter: str | None = None


class StoreOutputs:
    """A job's checkpoints and adapter in the artifact store, as store URIs.

    A local store is written in place; for a URI store, files are written to
    scratch and uploaded.
    """

    def __init__(self, store: ArtifactStore, scratch: Path, keep_checkpoints: int = 2) -> None:
        self.store = store
        self.scratch = scratch
        self.keep_checkpoints = keep_checkpoints

    def save_checkpoint(self, job: TrainingJob) -> str:
        uri = self.store.checkpoint_uri(job.name)
        local = self.store.local_path(uri)
        root = local if local is not None else self.scratch / "checkpoints" / job.name
        path = save_checkpoint(job, root, keep_last=self.keep_checkpoints)
        if local is None:
            self.store.upload_dir(root, uri)
        return f"{uri}/{path.name}"

    def discard_scratch(self, job_id: str) -> None:
        """Drop a job's local checkpoints once the store holds all that is kept of it (a
        URI store's are written here first, then uploaded)."""
        shutil.rmtree(self.scratch / "checkpoints" / job_id, ignore_errors=True)

    def export_adapter(self, job: TrainingJob) -> str:
        uri = self.store.adapter_uri(job.name)
        local = self.store.local_path(uri)
        out = local if local is not None else self.scratch / "export" / job.name
        export_job(job, out)
        if local is None:
            self.store.upload_dir(out, uri)
            shutil.rmtree(out, ignore_errors=True)
        return uri


class EngineWorker:
    def __init__(
        self,
        group_id: str,
        base_model: str,
        *,
        storage_root: str,
        scratch_dir: str | Path,
        device: str | None = None,
        trust_remote_code: bool = False,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        zero_stage: int | str = 0,
        engine_options: Mapping[str, Any] | None = None,
        keep_checkpoints: int = 2,
        quantization: QuantizationSpec | None = None,
    ) -> None:
        """With `world_size` > 1 (or ZeRO-3), joins the group's torch.distributed
        process group at `init_method` (gloo on CPU, NCCL on GPU) before loading
        the base. `zero_stage` is 0, 3 or "auto" (3 when the base would not fit
        comfortably on one device). `engine_options` go to `Engine` as they are
        (`OperatorConfig.engine_options`: micro-batch size, memory settings).
        Each job keeps its newest `keep_checkpoints` checkpoints in the store.
        `quantization` loads the base in 4 bits (the jobs' `base_quantization`)."""
        self.group_id = group_id
        self.rank = rank
        self.world_size = world_size
        self.is_leader = rank == 0
        self.store = ArtifactStore(storage_root)
        self.scratch = Path(scratch_dir) / group_id
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.outputs = StoreOutputs(self.store, self.scratch, keep_checkpoints)
        # The ranks' adapters are replicas: the leader alone writes them.
        self._writes: JobOutputs | None = self.outputs if self.is_leader else None
        if zero_stage == "auto":
            # ZeRO-3 cannot partition a 4-bit base, which is a quarter of the size anyway.
            zero_stage = (
                0
                if quantization is not None
                else _auto_zero_stage(base_model, device or "cpu", trust_remote_code)
            )
        data_parallel = None
        if world_size > 1 or zero_stage == 3:
            backend = "nccl" if device and device.startswith("cuda") else "gloo"
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=world_size
            )
            data_parallel = DataParallel(device=device or "cpu")
        self.engine = Engine(
            base_model,
            device=device,
            trust_remote_code=trust_remote_code,
            data_parallel=data_parallel,
            zero_stage=zero_stage,
            quantization=quantization,
            # Beside the group's scratch, so every group of this state directory shares it.
            reference_cache_dir=Path(scratch_dir) / "reference-logps",
            **(engine_options or {}),
        )
        log.info("group %s rank %d/%d: zero_stage=%s", group_id, rank, world_size, zero_stage)

    # -- membership, applied between rounds -------------------------------------------
    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None = None) -> JobAdmitted:
        """Admit a job (resuming from a checkpoint URI if given)."""
        local_resume = None
        if resume_from is not None:
            local_resume = self.store.local_path(resume_from)
            if local_resume is None:
                local_resume = self.store.download_dir(
                    resume_from, self.scratch / "resume" / job_id
                )
        try:
            job = self.engine.add_job(
                config.model_copy(update={"name": job_id}), resume_from=local_resume
            )
        finally:  # the job's state is in memory now, or it failed to load
            shutil.rmtree(self.scratch / "resume" / job_id, ignore_errors=True)
        verb = f"resumed at step {job.step}" if local_resume else "admitted"
        log.info("[job %s] %s to group %s (%d steps)", job_id, verb, self.group_id, job.total_steps)
        adapter = self._finish(job_id) if job.done else None
        return JobAdmitted(job.step, job.truncation_notices(), adapter)

    def remove_job(self, job_id: str, checkpoint: bool) -> str | None:
        """Take a job off the engine, checkpointing it first if asked; returns the checkpoint URI."""
        uri = None
        if checkpoint and self.is_leader and job_id in self.engine.jobs:
            uri = self.outputs.save_checkpoint(self.engine.jobs[job_id])
        if job_id in self.engine.jobs:
            self.engine.remove_job(job_id)
        if not checkpoint:  # cancelled: what the store keeps of it is all there is
            self.outputs.discard_scratch(job_id)
        log.info("[job %s] left group %s", job_id, self.group_id)
        return uri

    def stop_job(self, job_id: str) -> str | None:
        """Export a job's adapter as it stands (the leader; its store URI) and take the
        job off the engine: how a sweep's pruned trial ends, its adapter kept."""
        if job_id not in self.engine.jobs:
            return None
        return self._finish(job_id)

    def pid(self) -> int:
        return os.getpid()

    # -- training ---------------------------------------------------------------------
    def run_round(self) -> list[JobRoundResult]:
        """One round; finished jobs are exported (by the leader) and leave the engine.

        Every rank runs it; the leader's results are the group's (the others return none).
        """
        results = run_round(self.engine, self._writes)
        for r in results:
            if r.error is not None:
                log.error("[job %s] failed: %s", r.job, r.error)
            elif r.done:
                log.info("[job %s] finished at step %d, loss %s", r.job, r.step, r.loss)
            if r.error is not None or r.done:
                self.outputs.discard_scratch(r.job)
        return results if self.is_leader else []

    def _finish(self, job_id: str) -> str | None:
        """Export a done job (the leader; its store URI) and take it off the engine."""
        job = self.engine.jobs[job_id]
        adapter = finish_job(self.engine, job_id, self._writes)
        self.outputs.discard_scratch(job_id)
        log.info("[job %s] finished at step %d, loss %s", job_id, job.step, job.last_loss)
        return adapter


def admit_on_all_ranks(
    add: Callable[[], T],
    removes: Sequence[Callable[[], object]],
    *,
    group_lost: tuple[type[BaseException], ...] = (),
) -> T:
    """Admit a job on every rank of a group or on none.

    `add` admits it on every rank. If it raises, each of `removes` takes the
    job off one rank before the error propagates, so no rank keeps a job that
    the controller requeues or fails. Best effort: a rank that never got the
    job ignores the call (`EngineWorker.remove_job`), a dead one is skipped.
    An error of `group_lost` (a rank died) propagates at once: the controller
    shuts the whole group down, and a rank whose peer died can wait for it in the
    rendezvous or a collective, never answering a remove.
    """
    try:
        return add()
    except group_lost:
        raise
    except BaseException:
        for rank, remove in enumerate(removes):
            try:
                remove()
            except Exception:
                log.warning(
                    "rank %d: cannot remove a job that failed to start", rank, exc_info=True
                )
        raise


def _auto_zero_stage(base_model: str, device: str, trust_remote_code: bool) -> int:
    """ZeRO-3 when the base would take more than its share of one device's memory."""
    import torch

    on_gpu = device.startswith("cuda")
    dtype = default_dtype(torch.device(device))
    needed = base_parameter_bytes(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    if on_gpu:
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return choose_zero_stage(needed, memory)
