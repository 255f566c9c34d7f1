"""The detached controller actor: a loop thread ticking the Controller, plus the
requests clients send it.

Its module imports no torch and no control plane at the top: Ray unpickles the
actor's class, importing this module, in every client that looks the actor up
(`carpool status`), and the control plane (torch, transformers) costs seconds to
import. The actor itself imports it when it starts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from carpool.orchestrator.control.admission import check_admission
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobRecord
from carpool.orchestrator.sweeps.sweep_spec import LoadedSweep, SweepSpec, value_specs
from carpool.workers.spec.job_spec import JobSpec

log = logging.getLogger("carpool.ray")


def record_to_dict(record: JobRecord) -> dict:
    out = asdict(record)
    out["state"] = record.state.value
    return out


class CarpoolController:
    """The detached controller: a loop thread ticking the Controller, plus request methods."""

    def __init__(self, config: dict) -> None:
        from carpool.orchestrator.control.controller import Controller
        from carpool.orchestrator.runtime.ray_runtime import (
            RayMetrics,
            RayWorkerGroup,
            free_group_slots,
        )
        from carpool.orchestrator.serving.serving_news import tell_of_success
        from carpool.orchestrator.store.artifact_store import ArtifactStore

        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        self.config = OperatorConfig.model_validate(config)
        self.queue = JobQueue(self.config.queue_path())
        self.controller = Controller(
            self.queue,
            self.config,
            group_factory=lambda gid, base, quantization: RayWorkerGroup(
                gid, base, self.config, quantization
            ),
            free_group_slots=free_group_slots(self.config),
            checkpoints=ArtifactStore(self.config.storage_root()),
            metrics=RayMetrics(),
            on_success=lambda job_id: tell_of_success(self.config.state_dir, job_id),
        )
        self._lock = threading.Lock()  # the loop and shutdown never run at once
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, name="carpool-controller-loop", daemon=True)
        self._loop.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ran = False
            with self._lock:
                if self._stop.is_set():
                    break
                try:
                    ran = self.controller.tick()
                except Exception:
                    log.exception("controller tick failed")
            if not ran:  # idle: wait for work; busy: the next round starts at once
                time.sleep(self.config.poll_interval_s)

    def __repr__(self) -> str:  # the dashboard's Repr column, taken once at start
        c = self.config
        return (
            f"CarpoolController(state_dir={c.state_dir}, groups of {c.group_size} "
            f"rank(s), device={c.device})"
        )

    # -- requests (run on other actor threads; the queue is thread-safe) ---------------
    def ping(self) -> dict:
        return {
            "state_dir": str(self.config.state_dir),
            "storage": self.config.storage_root(),
            "pid": os.getpid(),
        }

    def submit(self, specs: list[dict]) -> list[str]:
        parsed = [JobSpec.model_validate(s) for s in specs]
        # Re-checked here: the operator's limits do not depend on the client's honesty.
        check_admission(parsed, self.config, [f"job {s.name}" for s in parsed])
        return self.controller.submit(parsed)

    def status(self, job_id: str | None = None) -> list[dict]:
        records = [self.queue.get(job_id)] if job_id else self.queue.list()
        return [record_to_dict(r) for r in records]

    def cancel(self, job_id: str) -> dict:
        return record_to_dict(self.queue.request_cancel(job_id))

    def logs(self, job_id: str, since: int = 0) -> list[str]:
        return self.queue.logs(job_id, since)

    def history(self, job_id: str, since: int = 0) -> list[dict]:
        return self.queue.history(job_id, since)

    def submit_sweep(self, spec: dict, template: dict, path: str) -> str:
        # Re-checked here, as jobs are: the template and each value a trial may take.
        loaded = LoadedSweep(SweepSpec.model_validate(spec), Path(path), template)
        values = value_specs(loaded)
        specs = [JobSpec.model_validate(raw) for raw in [template, *(v for _, v in values)]]
        sources = [f"sweep {spec['name']}"] + [f"sweep {spec['name']} {k}" for k, _ in values]
        check_admission(specs, self.config, sources)
        return self.controller.submit_sweep(spec, template, path)

    def sweep_status(self, name: str) -> dict:
        return {
            "sweep": asdict(self.queue.sweep(name)),
            "trials": [
                {**asdict(t), "job": record_to_dict(t.job)} for t in self.queue.trials(name)
            ],
        }

    def cancel_sweep(self, name: str) -> list[str]:
        with self._lock:  # between ticks: the loop queues no trial after the cancel
            return self.controller.sweeps.cancel(name)

    def shutdown(self) -> None:
        """Stop the loop, checkpoint running jobs back into the queue, stop the groups."""
        self._stop.set()
        with self._lock:
            self.controller.shutdown()
