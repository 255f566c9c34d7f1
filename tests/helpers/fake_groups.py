"""Fake worker groups for stepping the controller one tick at a time (no Ray).

As in Ray Train v2's controller tests, the worker groups are fakes: each
simulates training (every job advances one step per round, saves every
`save_steps`, exports when done), writes every call into one event log shared
by all groups of a factory, and refuses calls that break the protocol
(membership changes during a round, calls after shutdown), so a test can assert
both what the controller did and in which order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from carpool.orchestrator.control.controller import Controller, GroupFailedError
from carpool.orchestrator.control.engine_worker import JobAdmitted
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobState
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.rounds import JobRoundResult


def ckpt_uri(job_id: str, step: int) -> str:
    return f"mem://ckpt/{job_id}/step-{step:08d}"


def adapter_uri(job_id: str) -> str:
    return f"mem://adapters/{job_id}"


# -- fakes ------------------------------------------------------------------------------


class ProtocolViolation(BaseException):
    """A call the real worker group would not accept.

    A BaseException so that the controller's `except Exception` (which fails or
    retries the job whose add_job raised) cannot swallow it.
    """


@dataclass(frozen=True)
class Event:
    group: str  # the controller's group id
    call: str  # "add_job", "remove_job", "start_round", "finish_round", "shutdown"
    job: str | None = None
    detail: object = None  # add_job: resume_from; remove_job: checkpoint


@dataclass
class FakeJob:
    step: int
    total: int
    save_steps: int
    eval_steps: int | None = None  # evaluated every eval_steps and at the end
    evaluates: bool = False  # has an eval dataset
    eval_scale: float = 1.0  # its eval loss is eval_scale * 2 / step

    def eval_loss(self) -> float | None:
        due = self.step >= self.total or (self.eval_steps and self.step % self.eval_steps == 0)
        return self.eval_scale * 2.0 / self.step if self.evaluates and due else None


class FakeGroup:
    """Satisfies the controller's `WorkerGroup` protocol; simulates one step per round."""

    def __init__(
        self,
        group_id: str,
        base_model: str,
        events: list[Event],
        *,
        fail_at_round: int | None,
        reject: dict[str, Exception],
        notices: dict[str, tuple[str, ...]],
        drop: set[str],
        eval_scale: Callable[[JobSpec], float],
    ) -> None:
        self.group_id = group_id
        self.base_model = base_model
        self.events = events
        self.fail_at_round = fail_at_round
        self.reject = reject
        self.notices = notices
        self.drop = drop
        self.eval_scale = eval_scale
        self.jobs: dict[str, FakeJob] = {}
        self.configs: dict[str, JobSpec] = {}  # the config of every add_job, by job id
        self.rounds = 0
        self.in_round = False
        self.dead = fail_at_round == 0  # a test may also kill it between rounds
        self.is_shut_down = False

    def _enter(self, call: str, job: str | None = None, detail: object = None) -> None:
        self.events.append(Event(self.group_id, call, job, detail))
        if self.is_shut_down:
            raise ProtocolViolation(f"{call} on {self.group_id} after its shutdown")
        if call in ("add_job", "remove_job") and self.in_round:
            raise ProtocolViolation(f"{call}({job}) on {self.group_id} during a round")

    def _alive(self) -> None:
        if self.dead:
            raise GroupFailedError(f"group {self.group_id} lost a rank")

    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None) -> JobAdmitted:
        self._enter("add_job", job_id, resume_from)
        self._alive()
        if job_id in self.jobs:
            raise ProtocolViolation(f"{job_id} added twice to {self.group_id}")
        self.configs[job_id] = config
        if config.name in self.reject:
            raise self.reject[config.name]
        step = int(resume_from.rsplit("step-", 1)[1]) if resume_from else 0
        assert config.training.max_steps is not None
        t = config.training
        notices = self.notices.get(config.name, ())
        if step >= t.max_steps:  # as EngineWorker: a job resumed already done is exported now
            return JobAdmitted(step, notices, adapter_uri(job_id))
        self.jobs[job_id] = FakeJob(
            step,
            t.max_steps,
            t.save_steps,
            t.eval_steps,
            config.eval_dataset is not None,
            self.eval_scale(config),
        )
        return JobAdmitted(step, notices)

    def remove_job(self, job_id: str, checkpoint: bool) -> str | None:
        self._enter("remove_job", job_id, checkpoint)
        self._alive()
        if job_id not in self.jobs:
            raise ProtocolViolation(f"remove_job({job_id}): not in {self.group_id}")
        job = self.jobs.pop(job_id)
        return ckpt_uri(job_id, job.step) if checkpoint else None

    def stop_job(self, job_id: str) -> str | None:
        self._enter("stop_job", job_id)
        self._alive()
        if job_id not in self.jobs:
            raise ProtocolViolation(f"stop_job({job_id}): not in {self.group_id}")
        del self.jobs[job_id]
        return adapter_uri(job_id)

    def start_round(self) -> None:
        self._enter("start_round")
        if self.in_round:
            raise ProtocolViolation(f"start_round on {self.group_id} twice without finish_round")
        self._alive()
        self.in_round = True

    def finish_round(self) -> list[JobRoundResult]:
        self._enter("finish_round")
        if not self.in_round:
            raise ProtocolViolation(f"finish_round on {self.group_id} without start_round")
        self.in_round = False
        self._alive()
        self.rounds += 1
        if self.rounds == self.fail_at_round:
            self.dead = True
            raise GroupFailedError(f"group {self.group_id} lost a rank in round {self.rounds}")
        results = []
        for job_id, job in list(self.jobs.items()):
            job.step += 1
            done = job.step >= job.total
            if done:
                del self.jobs[job_id]
            if self.configs[job_id].name in self.drop:
                continue
            results.append(
                JobRoundResult(
                    job=job_id,
                    step=job.step,
                    total_steps=job.total,
                    loss=1.0 / job.step,
                    tokens_per_second=1000.0,
                    tokens=64,
                    tokens_seen=64 * job.step,
                    learning_rate=1e-3 / job.step,
                    grad_norm=0.5 + job.step,
                    checkpoint=ckpt_uri(job_id, job.step)
                    if job.step % job.save_steps == 0
                    else None,
                    adapter=adapter_uri(job_id) if done else None,
                    eval_loss=job.eval_loss(),
                    history=_history(job),
                )
            )
        return results

    def shutdown(self) -> None:
        self._enter("shutdown")  # a dead group shuts down quietly: nothing left to stop
        self.is_shut_down = True


def _history(job: FakeJob) -> tuple[dict, ...]:
    """A train entry every step (logging_steps 1), and the eval when there is one."""
    train = {"loss": 1.0 / job.step, "step": job.step}
    value = job.eval_loss()
    return (train,) if value is None else (train, {"eval_loss": value, "step": job.step})


class FakeCheckpoints:
    """The controller's checkpoint store: records each deletion with the job's state then."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.deleted: list[tuple[str, JobState]] = []

    def delete_checkpoints(self, job_id: str) -> None:
        self.deleted.append((job_id, self.queue.get(job_id).state))


class FakeGroupFactory:
    """The controller's group factory: makes FakeGroups that share one event log."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.groups: list[FakeGroup] = []
        self.reject: dict[str, Exception] = {}  # job name -> what add_job raises
        self.notices: dict[str, tuple[str, ...]] = {}  # job name -> what add_job reports
        self.drop: set[str] = set()  # job names whose results finish_round leaves out
        self.eval_scale: Callable[[JobSpec], float] = lambda config: 1.0
        self._fail_at: dict[int, int] = {}

    def fail_group(self, index: int, at_round: int) -> None:
        """The index-th group created fails in finish_round of that round (0: from its start)."""
        self._fail_at[index] = at_round

    def __call__(
        self, group_id: str, base_model: str, quantization: QuantizationSpec | None = None
    ) -> FakeGroup:
        group = FakeGroup(
            group_id,
            base_model,
            self.events,
            fail_at_round=self._fail_at.get(len(self.groups)),
            reject=self.reject,
            notices=self.notices,
            drop=self.drop,
            eval_scale=self.eval_scale,
        )
        self.groups.append(group)
        return group

    def since(self, mark: int) -> list[Event]:
        return self.events[mark:]

    def calls(self, call: str, job: str | None = None) -> list[Event]:
        return [e for e in self.events if e.call == call and (job is None or e.job == job)]


def make_controller(
    queue: JobQueue, factory: FakeGroupFactory, *, max_groups: int = 4, **config: object
) -> Controller:
    return Controller(
        queue,
        OperatorConfig.model_validate(config),
        factory,
        free_group_slots=lambda running: max_groups - running,
        checkpoints=FakeCheckpoints(queue),
    )


def run_to_end(controller: Controller, max_ticks: int = 50) -> None:
    """Tick until a tick runs no round."""
    for _ in range(max_ticks):
        if not controller.tick():
            return
    raise AssertionError(f"controller still busy after {max_ticks} ticks")
