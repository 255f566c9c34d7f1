"""A worker group of one `EngineWorker` in this process: the controller's whole loop over
real training without Ray (tests, and benchmarks that time the loop itself)."""

from __future__ import annotations

from pathlib import Path

from carpool.orchestrator.control.engine_worker import EngineWorker, JobAdmitted
from carpool.workers.spec.job_spec import JobSpec, QuantizationSpec
from carpool.workers.training.rounds import JobRoundResult


class LocalGroup:
    """The controller's `WorkerGroup` protocol over one in-process EngineWorker (one rank)."""

    def __init__(
        self, group_id: str, base_model: str, root: Path, engine_options: dict | None = None
    ) -> None:
        self.group_id = group_id
        self.base_model = base_model
        self.worker = EngineWorker(
            group_id,
            base_model,
            storage_root=str(root / "store"),
            scratch_dir=root / "scratch",
            device="cpu",
            engine_options=engine_options,
        )
        self._results: list[JobRoundResult] | None = None

    def add_job(self, job_id: str, config: JobSpec, resume_from: str | None) -> JobAdmitted:
        return self.worker.add_job(job_id, config, resume_from)

    def remove_job(self, job_id: str, checkpoint: bool) -> str | None:
        return self.worker.remove_job(job_id, checkpoint)

    def stop_job(self, job_id: str) -> str | None:
        return self.worker.stop_job(job_id)

    def start_round(self) -> None:
        self._results = self.worker.run_round()  # at once: there is nothing to overlap here

    def finish_round(self) -> list[JobRoundResult]:
        results, self._results = self._results or [], None
        return results

    def shutdown(self) -> None:
        pass


class LocalGroupFactory:
    """The controller's group factory: each group a LocalGroup under `root`."""

    def __init__(self, root: Path, engine_options: dict | None = None) -> None:
        self.root = root
        self.engine_options = engine_options
        self.groups: list[LocalGroup] = []

    def __call__(
        self, group_id: str, base_model: str, quantization: QuantizationSpec | None = None
    ) -> LocalGroup:
        group = LocalGroup(group_id, base_model, self.root, self.engine_options)
        self.groups.append(group)
        return group
