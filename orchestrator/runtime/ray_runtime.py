"""Every Ray call of the control plane: actors, names, resources, metrics.

The controller logic (`controller.Controller`) knows nothing of Ray; this
module gives it Ray-backed worker groups and a metrics sink, and runs it in a
detached, named actor that outlives CLI calls.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import time
from pathlib import Path

import ray
from carpool.orchestrator.control.controller import GroupFailedError
from carpool.orchestrator.control.engine_worker import EngineWorker, JobAdmitted, admit_on_all_ranks
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.runtime.actor_names import NAMESPACE
from carpool.orchestrator.store.job_records import JobState, TrialRecord
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.rounds import JobRoundResult
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util import metrics as ray_metrics
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)

log = logging.getLogger("carpool.ray")


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", Path(text).name or text)[:40]


class CarpoolWorker(EngineWorker):
    """One rank of a group, in its own process: log lines (prefixed with their job) reach Ray's logs.

    The dashboard shows this class's name and, in its Repr column, `repr()` taken
    when the actor starts: so the repr holds what never changes (group, base, rank).
    The jobs riding in the group change every few rounds: they are in the per-job
    metrics and the log lines.
    """

    def __init__(self, *args, threads: int, **kwargs) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this rank
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        engine = getattr(self, "engine", None)  # none yet, or never: its __init__ failed
        if engine is None:
            # Ray takes the repr to report an __init__ that raised: it must not raise too,
            # or the report says "an unexpected internal error" instead of the cause.
            return f"CarpoolWorker(group={getattr(self, 'group_id', '?')}, not started)"
        return (
            f"CarpoolWorker(group={self.group_id}, base={engine.base_model}, "
            f"rank={self.rank}/{self.world_size}, device={engine.device})"
        )


# Ports others take unasked: Ray's workers (its default 10002-19999) and, from the kernel's
# ephemeral range, every outgoing connection and every bind to port 0.
_RAY_WORKER_PORTS_END = 19999
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def rendezvous_port(attempts: int = 64) -> int:
    """A free TCP port on this host for a group's rendezvous, outside the ports others take
    unasked: it is bound by rank 0 seconds later, and a port from the ephemeral range was
    taken in between once (rank 0 then failed with EADDRINUSE). Port 0's choice if no
    port there is free."""
    try:
        ephemeral_start = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA ephemeral range
        ephemeral_start = 49152
    candidates = range(_RAY_WORKER_PORTS_END + 1, ephemeral_start)
    for port in random.sample(candidates, min(attempts, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@ray.remote(num_cpus=0)
def _rendezvous_address() -> str:
    """A TCP address on this node for torch.distributed's rendezvous."""
    return f"tcp://{ray.util.get_node_ip_address()}:{rendezvous_port()}"


class RayWorkerGroup:
    """A group of `group_size` ranks: named EngineWorker actors in one placement group.

    Every call goes to every rank (they hold the same jobs and run the same
    rounds); results and checkpoint URIs come from rank 0.
    """

    def __init__(
        self,
        group_id: str,
        base_model: str,
        config: OperatorConfig,
        quantization: QuantizationSpec | None = None,
    ) -> None:
        self.group_id = group_id
        self.base_model = base_model
        gpu = config.uses_gpu(ray.cluster_resources().get("GPU", 0))
        n = config.group_size
        bundles = []
        for rank in range(n):
            bundle = {"CPU": float(config.cpus_per_rank), **({"GPU": 1.0} if gpu else {})}
            if config.rank_resources:
                bundle.update(config.rank_resources[rank])
            bundles.append(bundle)
        self.placement = placement_group(
            bundles, strategy=config.placement_strategy, name=f"carpool-group-{group_id}"
        )
        try:
            ray.get(self.placement.ready(), timeout=config.placement_timeout_s)
        except GetTimeoutError as e:
            remove_placement_group(self.placement)  # do not hold half-reserved resources
            raise GroupFailedError(
                f"group {group_id}: no room for {n} ranks {bundles} "
                f"after {config.placement_timeout_s}s"
            ) from e
        init_method = None
        if n > 1 or config.zero_stage != 0:
            init_method = ray.get(
                _rendezvous_address.options(scheduling_strategy=self._on(0)).remote()
            )
        actor_cls = ray.remote(CarpoolWorker)
        self.actors = [
            actor_cls.options(
                name=f"carpool-group-{group_id}-base-{_slug(base_model)}-rank-{rank}",
                namespace=NAMESPACE,
                num_cpus=config.cpus_per_rank,
                num_gpus=1 if gpu else 0,
                max_restarts=0,
                scheduling_strategy=self._on(rank),
            ).remote(
                group_id,
                base_model,
                storage_root=config.storage_root(),
                scratch_dir=str(config.state_dir / "scratch"),
                device="cuda" if gpu else "cpu",
                trust_remote_code=config.trust_remote_code,
                threads=config.cpus_per_rank,
                rank=rank,
                world_size=n,
                init_method=init_method,
                zero_stage=config.zero_stage,
                engine_options=config.engine_options(),
                quantization=quantization,
                keep_checkpoints=config.keep_checkpoints,
            )
            for rank in range(n)
        ]
        self._pending = None

    def _on(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement, placement_group_bundle_index=rank
        )

    def _all(self, method: str, *args):
        """Call `method` on every rank; rank 0's answer."""
        return self._get([getattr(a, method).remote(*args) for a in self.actors])[0]

    def _get(self, refs):
        try:
            return ray.get(refs)
        except _ACTOR_LOST as e:
            raise GroupFailedError(f"group {self.group_id}: {e}") from e

    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None) -> JobAdmitted:
        # An actor runs our calls in order: a rank's remove never overtakes its add.
        removes = [
            lambda actor=actor: ray.get(actor.remove_job.remote(job_id, False))
            for actor in self.actors
        ]
        return admit_on_all_ranks(
            lambda: self._all("add_job", job_id, config, resume_from),
            removes,
            group_lost=(GroupFailedError,),
        )

    def remove_job(self, job_id: str, checkpoint: bool) -> str | None:
        return self._all("remove_job", job_id, checkpoint)

    def stop_job(self, job_id: str) -> str | None:
        return self._all("stop_job", job_id)

    def start_round(self) -> None:
        self._pending = [a.run_round.remote() for a in self.actors]

    def finish_round(self) -> list[JobRoundResult]:
        refs, self._pending = self._pending, None
        return self._get(refs)[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement)


_FINISHED_GAUGES_KEPT = 256  # jobs whose last figures are re-exported


def _remember(table: dict, job_id: str, value: object) -> None:
    """Put `value` under `job_id` as the newest entry, dropping the oldest past the cap."""
    table.pop(job_id, None)
    table[job_id] = value
    while len(table) > _FINISHED_GAUGES_KEPT:
        table.pop(next(iter(table)))


class RayMetrics:
    """carpool's metrics on the Ray node's Prometheus endpoint, tagged by job and group.

    Updates are throttled to one per job per `interval_s`: Ray exports every few
    seconds anyway, and a metric update per job per round measurably slowed
    training on a small machine (benchmarks/orchestrator.py: 1.37x -> ~1.0x).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last_push: dict[str, float] = {}
        self._unpushed_tokens: dict[str, int] = {}
        tags = ("job", "group")
        self.loss = ray_metrics.Gauge("carpool_job_loss", "training loss of the last step", tags)
        self.tps = ray_metrics.Gauge("carpool_job_tokens_per_second", "tokens/s", tags)
        self.step = ray_metrics.Gauge("carpool_job_step", "optimizer steps done", tags)
        self.learning_rate = ray_metrics.Gauge(
            "carpool_job_learning_rate", "learning rate of the last step", tags
        )
        self.grad_norm = ray_metrics.Gauge(
            "carpool_job_grad_norm", "gradient norm of the last step, before clipping", tags
        )
        self.eval_loss = ray_metrics.Gauge("carpool_job_eval_loss", "loss on the eval rows", tags)
        # A preference job's step figures, TRL's names with "/" as "_" (Ray's names allow none).
        self.objective_figures = {
            "rewards/chosen": ray_metrics.Gauge(
                "carpool_job_rewards_chosen", "beta x log-ratio of the chosen completions", tags
            ),
            "rewards/rejected": ray_metrics.Gauge(
                "carpool_job_rewards_rejected", "beta x log-ratio of the rejected ones", tags
            ),
            "rewards/accuracies": ray_metrics.Gauge(
                "carpool_job_rewards_accuracies",
                "share of pairs whose chosen reward is higher",
                tags,
            ),
            "rewards/margins": ray_metrics.Gauge(
                "carpool_job_rewards_margins", "mean chosen minus rejected reward", tags
            ),
            "kl": ray_metrics.Gauge("carpool_job_kl", "a KTO job's KL estimate of its step", tags),
            "nll_loss": ray_metrics.Gauge(
                "carpool_job_nll_loss", "a CPO or ORPO job's chosen-row cross-entropy", tags
            ),
        }
        self._last_eval: dict[str, tuple[float, str]] = {}  # job -> (eval loss, group)
        self._finished: dict[str, tuple[JobRoundResult, str]] = {}  # job -> (last round, group)
        self.tokens = ray_metrics.Counter("carpool_job_tokens_total", "tokens trained", tags)
        self.states = ray_metrics.Gauge("carpool_jobs", "jobs by state", ("state",))
        self.depth = ray_metrics.Gauge("carpool_queue_depth", "queued jobs")
        self.sweep_best = ray_metrics.Gauge(
            "carpool_sweep_best_eval_loss", "a sweep's best eval loss so far", ("sweep",)
        )
        self.sweep_trials = ray_metrics.Gauge(
            "carpool_sweep_trials", "a sweep's trials by state", ("sweep", "state")
        )
        self.trial_best = ray_metrics.Gauge(
            "carpool_sweep_trial_eval_loss",
            "each trial's best eval loss so far, tagged by its sweep",
            ("sweep", "trial", "job"),
        )

    def job_progress(self, job_id: str, group_id: str, result: JobRoundResult) -> None:
        if result.eval_loss is not None:  # rare: pushed at once, never throttled away
            self.eval_loss.set(result.eval_loss, tags={"job": job_id, "group": group_id})
            _remember(self._last_eval, job_id, (result.eval_loss, group_id))
        tokens = self._unpushed_tokens.get(job_id, 0) + result.tokens
        now = time.monotonic()
        finished = result.step >= result.total_steps
        if not finished and now - self._last_push.get(job_id, 0.0) < self.interval_s:
            self._unpushed_tokens[job_id] = tokens
            return
        tags = {"job": job_id, "group": group_id}
        self._set_step_gauges(result, tags)
        self.tokens.inc(tokens, tags=tags)
        self._unpushed_tokens.pop(job_id, None)
        self._last_push[job_id] = now
        if finished:  # its gauges are never set again: kept for the re-export in queue_state
            self._last_push.pop(job_id, None)
            _remember(self._finished, job_id, (result, group_id))

    def _set_step_gauges(self, result: JobRoundResult, tags: dict[str, str]) -> None:
        self.loss.set(result.loss, tags=tags)
        self.tps.set(result.tokens_per_second, tags=tags)
        self.step.set(result.step, tags=tags)
        self.learning_rate.set(result.learning_rate, tags=tags)
        self.grad_norm.set(result.grad_norm, tags=tags)
        for name, gauge in self.objective_figures.items():
            if name in result.metrics:
                gauge.set(result.metrics[name], tags=tags)

    def queue_state(self, counts: dict[JobState, int]) -> None:
        now = time.monotonic()
        if now - self._last_push.get("", 0.0) < self.interval_s:
            return
        self._last_push[""] = now
        # An eval loss is set once per evaluation, often long before a scrape; set
        # the latest ones again so a finished job's last eval loss stays exported.
        for job_id, (value, group_id) in self._last_eval.items():
            self.eval_loss.set(value, tags={"job": job_id, "group": group_id})
        for job_id, (result, group_id) in self._finished.items():  # and their last step's
            self._set_step_gauges(result, {"job": job_id, "group": group_id})
        for state, n in counts.items():
            self.states.set(n, tags={"state": state.value})
        self.depth.set(counts.get(JobState.QUEUED, 0))

    def sweep_progress(self, sweep: str, trials: list[TrialRecord]) -> None:
        now = time.monotonic()
        if now - self._last_push.get(f"sweep:{sweep}", 0.0) < self.interval_s:
            return
        self._last_push[f"sweep:{sweep}"] = now
        scored = [t.best for t in trials if t.best is not None]
        if scored:
            self.sweep_best.set(min(scored), tags={"sweep": sweep})
        for state in JobState:
            n = sum(1 for t in trials if t.job.state == state)
            self.sweep_trials.set(n, tags={"sweep": sweep, "state": state.value})
        for t in trials:
            if t.best is not None:
                tags = {"sweep": sweep, "trial": str(t.number), "job": t.job.id}
                self.trial_best.set(t.best, tags=tags)


def free_group_slots(config: OperatorConfig):
    """How many more groups the cluster can host: by GPUs or CPUs, capped by max_groups."""

    def slots(running: int) -> int:
        resources = ray.cluster_resources()
        if config.uses_gpu(resources.get("GPU", 0)):
            capacity = int(resources.get("GPU", 0)) // config.group_size
        else:
            capacity = int(resources.get("CPU", 0)) // (config.group_size * config.cpus_per_rank)
        if config.max_groups is not None:
            capacity = min(capacity, config.max_groups)
        return max(0, capacity - running)

    return slots
