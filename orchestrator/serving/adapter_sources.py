"""Where served adapters come from: the queue's succeeded jobs and named directories.

A queue adapter is copied from the artifact store to a local cache when it is
registered (a local store is read in place), so its first request does not wait
for a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.serving.adapter_catalog import (
    AdapterCatalog,
    AdapterVersion,
    directory_hash,
)
from carpool.orchestrator.store.artifact_store import ArtifactStore
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobRecord, JobState


@dataclass(frozen=True)
class FinishedJob:
    """What the controller tells the endpoint of a job that succeeded."""

    id: str
    name: str
    base_model: str
    quantization: dict | None
    finished_at: float

    @classmethod
    def of(cls, record: JobRecord) -> FinishedJob:
        return cls(
            record.id,
            record.name,
            record.base_model,
            record.spec.get("base_quantization"),
            record.updated_at,
        )


def succeeded_jobs(config: OperatorConfig) -> list[FinishedJob]:
    """Every succeeded job of the queue, oldest first."""
    if not config.queue_path().exists():
        return []
    with JobQueue(config.queue_path()) as queue:
        records = queue.list([JobState.SUCCEEDED])
    return sorted((FinishedJob.of(r) for r in records), key=lambda j: j.finished_at)


def job_version(
    job: FinishedJob, catalog: AdapterCatalog, config: OperatorConfig
) -> AdapterVersion:
    """The job's adapter as a version on its base (which must be served)."""
    base = catalog.add_base(job.base_model, job.quantization)
    store = ArtifactStore(config.storage_root())
    uri = store.adapter_uri(job.id)
    path = store.local_path(uri)
    if path is None:  # a remote store: copied once, now
        path = store.download_dir(uri, config.state_dir / "serve" / "adapters" / job.id)
    return AdapterVersion(
        id=job.id, name=job.name, base=base.key, path=str(path), root=f"job {job.id}",
        created=job.finished_at,
    )  # fmt: skip


def directory_version(name: str, path: Path, base_key: str) -> AdapterVersion:
    """A named directory's adapter; created 0, so a queue job of that name is newer."""
    path = path.resolve()
    return AdapterVersion(
        id=f"{name}-{directory_hash(path)}", name=name, base=base_key, path=str(path),
        root=str(path), created=0.0,
    )  # fmt: skip
