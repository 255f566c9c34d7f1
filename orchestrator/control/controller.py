"""The controller: executes the scheduler's decisions and runs the groups' rounds.

An explicit loop, one `tick` at a time, with no Ray in it: groups come from a
factory (Ray actors in production, fakes in tests) and metrics go to a sink.
Each tick:
  1. cancelled jobs leave their groups (between rounds: none is in flight);
  2. the scheduler decides from the queue and the groups; the decisions are
     executed in order (preempt, stop, start, admit);
  3. every group with jobs runs one round, all groups in parallel, and the
     results (progress, checkpoints, finished adapters) go into the queue.
Membership changes therefore always happen between rounds, never during one.

The queue is read through a `QueueView` (only jobs whose state changed since the
last read), and step 2 is skipped while the scheduler's inputs are those of a
plan that decided nothing: it would decide nothing again. So a tick with nothing
new costs the same with ten thousand jobs waiting as with none.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from carpool.orchestrator.control.engine_worker import JobAdmitted
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.control.scheduler import (
    AdmitJob,
    Capacity,
    ClusterView,
    GroupView,
    JobDemand,
    PreemptJob,
    StartGroup,
    StopGroup,
    schedule,
)
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import FINAL_STATES, JobRecord, JobState, TrialRecord
from carpool.orchestrator.store.queue_view import QueueView
from carpool.orchestrator.sweeps.sweep_driver import SweepDriver
from carpool.workers.base.base_model import linear_module_shapes, match_target_modules
from carpool.workers.spec.job_spec import AdapterSpec, JobInputError, JobSpec, QuantizationSpec
from carpool.workers.spec.objective import needs_reference
from carpool.workers.training.checkpoint import checkpoint_step
from carpool.workers.training.rounds import JobRoundResult
from carpool.workers.variants.adalora import adalora_parameter_count
from carpool.workers.variants.vera import vera_parameter_count

log = logging.getLogger("carpool.controller")

# Weights, gradients and AdamW's two moments, in float32.
_BYTES_PER_ADAPTER_PARAM = 4 * 4
_BYTES_PER_FROZEN_PARAM = 4  # float32, no gradient or optimizer state
_PROGRESS_LOG_EVERY = 10


class GroupFailedError(RuntimeError):
    """A worker group died (a rank's process or node was lost)."""


class WorkerGroup(Protocol):
    group_id: str
    base_model: str

    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None) -> JobAdmitted: ...
    def remove_job(self, job_id: str, checkpoint: bool) -> str | None: ...
    def stop_job(self, job_id: str) -> str | None: ...  # export as it stands; the URI
    def start_round(self) -> None: ...
    def finish_round(self) -> list[JobRoundResult]: ...
    def shutdown(self) -> None: ...


# (group id, base model, its quantization) -> a started group holding that base.
GroupFactory = Callable[[str, str, QuantizationSpec | None], WorkerGroup]


class CheckpointStore(Protocol):
    """Where workers keep jobs' checkpoints (`ArtifactStore`)."""

    def delete_checkpoints(self, job_id: str) -> None: ...


class MetricsSink(Protocol):
    def job_progress(self, job_id: str, group_id: str, result: JobRoundResult) -> None: ...
    def queue_state(self, counts: dict[JobState, int]) -> None: ...
    def sweep_progress(self, sweep: str, trials: list[TrialRecord]) -> None: ...


class NoMetrics:
    def job_progress(self, job_id: str, group_id: str, result: JobRoundResult) -> None:
        pass

    def queue_state(self, counts: dict[JobState, int]) -> None:
        pass

    def sweep_progress(self, sweep: str, trials: list[TrialRecord]) -> None:
        pass


@dataclass
class _Group:
    handle: WorkerGroup
    jobs: dict[str, JobDemand]
    quantization: QuantizationSpec | None = None  # the base's, as the group was started


class Controller:
    def __init__(
        self,
        queue: JobQueue,
        config: OperatorConfig,
        group_factory: GroupFactory,
        free_group_slots: Callable[[int], int],
        checkpoints: CheckpointStore,
        metrics: MetricsSink | None = None,
        on_success: Callable[[str], None] | None = None,
    ) -> None:
        """`free_group_slots(running_groups)` says how many more groups resources allow;
        a job that succeeded has its checkpoints deleted from `checkpoints`, and its id
        passed to `on_success` once its success is recorded (the serving app's news)."""
        self.queue = queue
        self.config = config
        self.group_factory = group_factory
        self.free_group_slots = free_group_slots
        self.checkpoints = checkpoints
        self.metrics = metrics or NoMetrics()
        self.on_success = on_success or (lambda job_id: None)
        self.groups: dict[str, _Group] = {}
        self._shapes: dict[str, dict[str, tuple[int, int]]] = {}
        # A job's demand never changes: parse its spec once, not on every tick.
        self._demands: dict[str, JobDemand] = {}
        for record in queue.recover_running():
            log.info("[job %s] requeued after controller restart", record.id)
        self.view = QueueView(queue)
        self.sweeps = SweepDriver(
            queue, queue.path.parent / "sweeps.journal", self._prune, self.metrics
        )
        self._queue_changed = True  # since the last plan
        self._settled: tuple | None = None  # the inputs of the last plan, if it decided nothing

    # -- requests -----------------------------------------------------------------------
    def submit(self, specs: Sequence[JobSpec]) -> list[str]:
        """Queue validated specs in one transaction; returns their job ids."""
        ids = self.queue.submit(
            [(s.name, s.model_dump(mode="json"), s.base_model, s.priority) for s in specs]
        )
        for job_id in ids:
            self.queue.append_log(job_id, "queued")
        return ids

    # -- the loop -----------------------------------------------------------------------
    def tick(self) -> bool:
        """One pass of the loop; True if any group ran a round (so no need to pause)."""
        self._refresh()
        if self._apply_cancellations():
            self._refresh()
        self._plan()
        ran = self._run_rounds()
        self._refresh()
        if self.sweeps.tick():  # trials pruned or queued
            self._refresh()
        self.metrics.queue_state(dict(self.view.counts))
        return ran

    def _refresh(self) -> list[JobRecord]:
        changed = self.view.refresh()
        for record in changed:
            self._queue_changed = True
            if record.state in FINAL_STATES:
                self._demands.pop(record.id, None)
        return changed

    def _prepare_while_rounds_run(self) -> None:
        """Take in what changed and parse new jobs' demands while the groups compute, so
        that between rounds only the scheduler itself is left to run. Reads only:
        membership still changes between rounds alone."""
        for record in self._refresh():
            if record.state == JobState.QUEUED:
                with contextlib.suppress(Exception):  # _decide fails the job, with the error
                    self._demand(record)

    def _apply_cancellations(self) -> bool:
        """Stop running jobs whose cancel was requested; True if there was any."""
        cancelled = False
        for record in list(self.view.running.values()):
            if record.cancel_requested and record.group in self.groups:
                cancelled = True
                group = self.groups[record.group]
                group.jobs.pop(record.id, None)
                try:
                    group.handle.remove_job(record.id, checkpoint=False)
                except GroupFailedError:
                    self._group_failed(record.group)
                self._finish(record.id, JobState.CANCELLED)
                self.queue.append_log(record.id, "cancelled")
        return cancelled

    def submit_sweep(self, spec: dict, template: dict, path: str) -> str:
        """Record a validated sweep; its trials are queued by the loop, a few at a time."""
        self.queue.create_sweep(spec["name"], spec, template, path)
        return spec["name"]

    def _prune(self, job_id: str, reason: str) -> None:
        """Stop a running trial between rounds; it ends `pruned`, its adapter exported."""
        record = self.queue.get(job_id)
        group = self.groups.get(record.group or "")
        adapter = None
        if group is not None and job_id in group.jobs:
            group.jobs.pop(job_id)
            try:
                adapter = group.handle.stop_job(job_id)
            except GroupFailedError:
                group.jobs[job_id] = self._demand(record)  # requeued with the group's others
                self._group_failed(record.group)
                return
        self._demands.pop(job_id, None)
        self.queue.prune(job_id, adapter)
        self.queue.append_log(job_id, reason)
        self._delete_checkpoints(job_id)

    def _plan(self) -> None:
        """Decide and execute, unless nothing the scheduler reads changed since a plan
        that decided nothing (a plan that did decide changed the world: plan again)."""
        slots = self.free_group_slots(len(self.groups))
        inputs = (
            slots,
            tuple((gid, tuple(g.jobs)) for gid, g in self.groups.items()),
            (self.config.max_tokens_per_step, self.config.max_adapters_per_group),
            self.config.max_memory_bytes,
        )
        if not self._queue_changed and inputs == self._settled:
            return
        self._queue_changed, self._settled = False, None  # a plan that raises is redone
        decisions = self._decide(slots)
        self._settled = None if decisions else inputs
        self._execute(decisions)

    def _decide(self, free_group_slots: int) -> list:
        demands = []
        for record in list(self.view.queued.values()):
            try:
                demands.append(self._demand(record))
            except Exception as e:  # e.g. the base model vanished since submission
                self._finish(record.id, JobState.FAILED, error=f"cannot schedule: {e}")
        views = [
            GroupView(gid, g.handle.base_model, tuple(g.jobs.values()), g.quantization)
            for gid, g in self.groups.items()
        ]
        capacity = Capacity(
            max_tokens_per_step=self.config.max_tokens_per_step,
            max_adapters_per_group=self.config.max_adapters_per_group,
            max_memory_bytes=self.config.max_memory_bytes,
        )
        cluster = ClusterView(free_group_slots=free_group_slots)
        return schedule(demands, views, cluster, capacity, _new_group_id)

    def _execute(self, decisions: list) -> None:
        for decision in decisions:
            if not isinstance(decision, StartGroup) and decision.group_id not in self.groups:
                continue  # its group failed earlier in this tick; the next tick re-plans
            if isinstance(decision, PreemptJob):
                self._preempt(decision)
            elif isinstance(decision, StopGroup):
                self.groups.pop(decision.group_id).handle.shutdown()
            elif isinstance(decision, StartGroup):
                try:
                    handle = self.group_factory(
                        decision.group_id, decision.base_model, decision.quantization
                    )
                except GroupFailedError as e:  # no room for its ranks: jobs stay queued
                    log.warning("cannot start group %s: %s", decision.group_id, e)
                    continue
                self.groups[decision.group_id] = _Group(handle, {}, decision.quantization)
            elif isinstance(decision, AdmitJob):
                self._admit(decision)

    def _admit(self, decision: AdmitJob) -> None:
        group = self.groups[decision.group_id]
        record = self.queue.mark_running(decision.job_id, decision.group_id)
        try:
            admitted = group.handle.add_job(record.id, self.job_config(record), record.checkpoint)
        except GroupFailedError:
            group.jobs[record.id] = self._demand(record)  # so the failure requeues it too
            self._group_failed(decision.group_id)
            return
        except Exception as e:
            # Ray wraps an actor's exception; the original is its `cause`.
            cause = getattr(e, "cause", None)
            error = cause if isinstance(cause, Exception) else e
            if isinstance(error, JobInputError):  # the job's own fault: never retried
                self._finish(record.id, JobState.FAILED, error=str(error))
                self.queue.append_log(record.id, f"failed to start: {error}")
                return
            # Carpool's fault, not the job's: retried like a lost group.
            log.exception("[job %s] internal error while starting", record.id)
            what = f"{type(error).__name__}: {error}"
            self._retry(
                record.id,
                f"internal error while starting: {what}",
                failure=f"internal error after {record.attempts} attempts: {what}",
            )
            return
        how = f"resumed from step {admitted.step}" if record.checkpoint else "started"
        variant = self.job_config(record).adapter.variant
        self.queue.append_log(record.id, f"{how} in group {decision.group_id} ({variant})")
        for notice in admitted.notices:
            self.queue.append_log(record.id, notice)
        if admitted.adapter is not None:  # resumed from its final checkpoint: nothing to train
            self._finish(record.id, JobState.SUCCEEDED)
            self.queue.append_log(record.id, f"succeeded: adapter at {admitted.adapter}")
            self._delete_checkpoints(record.id)
            self.on_success(record.id)
            return
        group.jobs[record.id] = self._demand(record)

    def _preempt(self, decision: PreemptJob) -> None:
        group = self.groups[decision.group_id]
        try:
            reason = f"preempted: {decision.reason}"
            self._checkpoint_and_requeue(group, decision.job_id, reason, preempted=True)
        except GroupFailedError:
            self._group_failed(decision.group_id)

    def _run_rounds(self) -> bool:
        busy = [(gid, g) for gid, g in self.groups.items() if g.jobs]
        started = []
        for gid, group in busy:
            try:
                group.handle.start_round()
                started.append((gid, group))
            except GroupFailedError:
                self._group_failed(gid)
        if started:
            self._prepare_while_rounds_run()
        for gid, group in started:
            try:
                results = group.handle.finish_round()
            except GroupFailedError:
                self._group_failed(gid)
                continue
            in_round = set(group.jobs)
            for result in results:
                self._record(gid, group, result)
            self._retry_unreported(gid, group, in_round - {r.job for r in results})
        return bool(started)

    def _retry_unreported(self, group_id: str, group: _Group, job_ids: set[str]) -> None:
        """Jobs a round gave no result for: their state on the group is unknown,
        so they leave it and resume from their last recorded checkpoint."""
        for job_id in sorted(job_ids):
            log.warning("[job %s] no result from group %s in a round", job_id, group_id)
            try:
                group.handle.remove_job(job_id, checkpoint=False)
            except GroupFailedError:
                self._group_failed(group_id)  # requeues these jobs with the group's others
                return
            group.jobs.pop(job_id)
            self._retry(job_id, f"group {group_id} reported no result for it in a round")

    def _record(self, group_id: str, group: _Group, r: JobRoundResult) -> None:
        if r.error is not None:  # its own fault: fails alone, never retried
            group.jobs.pop(r.job, None)
            self._finish(r.job, JobState.FAILED, error=r.error)
            self.queue.append_log(r.job, f"failed: {r.error}")
            return
        if r.eval_loss is not None:
            self.queue.append_log(
                r.job, f"step {r.step}/{r.total_steps} eval_loss {r.eval_loss:.4f}"
            )
        if r.step % _PROGRESS_LOG_EVERY == 0 or r.adapter is not None:
            margin = r.metrics.get("rewards/margins")
            self.queue.append_log(
                r.job, f"step {r.step}/{r.total_steps} loss {r.loss:.4f} "
                f"lr {r.learning_rate:.3g} grad_norm {r.grad_norm:.4f} "
                + ("" if margin is None else f"rewards/margins {margin:.4f} ")
                + f"{r.tokens_per_second:,.0f} tokens/s"
            )  # fmt: skip
        # What HF's Trainer logs too, beside loss: the status shows them (`metrics`).
        metrics = {
            "learning_rate": r.learning_rate,
            "grad_norm": r.grad_norm,
            "tokens_seen": r.tokens_seen,
        }
        metrics.update(r.metrics)  # a preference job's rewards/* and logps/*, TRL's names
        if r.eval_loss is not None:
            metrics.update(eval_loss=r.eval_loss, eval_step=r.step)
        # Progress, checkpoint and success in one transaction (see JobQueue.record_progress).
        self.queue.record_progress(
            r.job,
            step=r.step,
            total_steps=r.total_steps,
            loss=r.loss,
            tokens_per_second=r.tokens_per_second,
            metrics=metrics,
            checkpoint=r.checkpoint,
            adapter=r.adapter,
            history=r.history,
        )
        self.metrics.job_progress(r.job, group_id, r)
        if r.adapter is not None:
            group.jobs.pop(r.job, None)
            self._demands.pop(r.job, None)
            self._delete_checkpoints(r.job)
            self.on_success(r.job)

    def _delete_checkpoints(self, job_id: str) -> None:
        """Only once the job's success is in the queue: until then, a restart resumes
        it from its last checkpoint (and, that being its final one, finishes it at once)."""
        try:
            self.checkpoints.delete_checkpoints(job_id)
        except Exception:  # the job succeeded all the same: leftovers only cost space
            log.warning("[job %s] cannot delete its checkpoints", job_id, exc_info=True)

    def _group_failed(self, group_id: str) -> None:
        """Requeue the group's jobs to resume from their checkpoints, up to max_attempts."""
        group = self.groups.pop(group_id)
        for job_id in group.jobs:
            self._retry(job_id, f"group {group_id} failed")
        with contextlib.suppress(Exception):  # already dead
            group.handle.shutdown()

    def _retry(self, job_id: str, reason: str, failure: str | None = None) -> None:
        """Requeue a running job to resume from its checkpoint; once out of attempts,
        fail it with `failure` (by default: the reason, out of attempts)."""
        if self.queue.get(job_id).attempts >= self.config.max_attempts:
            error = failure or f"{reason}; out of attempts"
            self._finish(job_id, JobState.FAILED, error=error)
            self.queue.append_log(job_id, f"failed: {error}")
        else:
            self.queue.requeue(job_id, f"{reason}; retrying from checkpoint")

    def shutdown(self) -> None:
        """Checkpoint every running job back into the queue and stop the groups."""
        for gid in list(self.groups):
            group = self.groups.pop(gid)
            for job_id in list(group.jobs):
                try:
                    self._checkpoint_and_requeue(group, job_id, "controller shut down")
                except GroupFailedError:
                    self.queue.requeue(job_id, "controller shut down; group lost")
            group.handle.shutdown()

    def _checkpoint_and_requeue(
        self, group: _Group, job_id: str, reason: str, preempted: bool = False
    ) -> None:
        uri = group.handle.remove_job(job_id, checkpoint=True)
        group.jobs.pop(job_id, None)
        if uri is not None:
            self.queue.record_checkpoint(job_id, uri, checkpoint_step(uri))
        self.queue.requeue(job_id, reason, preempted=preempted)

    # -- helpers -----------------------------------------------------------------------------
    def _finish(self, job_id: str, state: JobState, error: str | None = None) -> None:
        self._demands.pop(job_id, None)
        self.queue.finish(job_id, state, error=error)

    def job_config(self, record: JobRecord) -> JobSpec:
        config = JobSpec.model_validate(record.spec)
        every = self.config.checkpoint_every_steps
        if every is not None:
            training = config.training.model_copy(update={"save_steps": every})
            config = config.model_copy(update={"training": training})
        return config

    def _demand(self, record: JobRecord) -> JobDemand:
        if record.id not in self._demands:
            self._demands[record.id] = self._compute_demand(record)
        return self._demands[record.id]

    def _compute_demand(self, record: JobRecord) -> JobDemand:
        config = JobSpec.model_validate(record.spec)
        if config.base_model not in self._shapes:
            self._shapes[config.base_model] = linear_module_shapes(
                config.base_model, trust_remote_code=self.config.trust_remote_code
            )
        return JobDemand(
            id=record.id,
            base_model=config.base_model,
            priority=record.priority,
            seq=record.seq,
            tokens_per_step=config.tokens_per_step,
            memory_bytes=adapter_memory_bytes(
                config.adapter,
                self._shapes[config.base_model],
                frozen_copy=needs_reference(config.objective)
                and config.adapter.init_from is not None,
            ),
            quantization=config.base_quantization,
        )


def adapter_memory_bytes(
    adapter: AdapterSpec, shapes: dict[str, tuple[int, int]], frozen_copy: bool = False
) -> int:
    """A job's adapter and optimizer state, in bytes: each targeted module at its own rank,
    with DoRA's magnitude (one per output channel). VeRA: its two vectors per module with
    their optimizer state, plus the frozen projections once (an upper bound: jobs with the
    same key may share them). AdaLoRA: init_r triplets per module, each weight with two
    float32 importance averages besides its optimizer state. DyLoRA is LoRA's size; SoRA
    LoRA's with a gate entry per rank. `frozen_copy`: a preference
    job's frozen starting adapter too (its reference), its trained weights once more."""
    targets = match_target_modules(list(shapes), adapter.target_modules)
    if adapter.peft_type == "ADALORA":
        params = adalora_parameter_count([shapes[m] for m in targets], adapter.init_r)
        state = params * (_BYTES_PER_ADAPTER_PARAM + 2 * _BYTES_PER_FROZEN_PARAM)
    elif adapter.peft_type == "VERA":
        params, projections = vera_parameter_count([shapes[m] for m in targets], adapter.r)
        state = params * _BYTES_PER_ADAPTER_PARAM + projections * _BYTES_PER_FROZEN_PARAM
    else:
        params = sum(
            adapter.rank_of(m) * (shapes[m][0] + shapes[m][1])
            + (shapes[m][1] if adapter.use_dora else 0)
            + (adapter.r if adapter.peft_type == "SORA" else 0)  # its gates
            for m in targets
        )
        state = params * _BYTES_PER_ADAPTER_PARAM
    return state + (params * _BYTES_PER_FROZEN_PARAM if frozen_copy else 0)


def _new_group_id(base_model: str) -> str:
    return f"g{uuid.uuid4().hex[:6]}"
