"""The Python client: every CLI command, as methods.

`Client.up()` starts (or attaches to) Ray and the controller; other calls
attach to the running controller through the address recorded in the state
directory. Specs are validated here, before anything reaches the queue, so a
bad file queues nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from carpool.orchestrator.control.operator_config import OperatorConfig, load_operator_config
from carpool.orchestrator.runtime.local_ray import start_head, stop_cluster
from carpool.orchestrator.runtime.ray_auth import require_token
from carpool.orchestrator.store.artifact_store import ArtifactStore
from carpool.orchestrator.store.job_ids import validate_job_id
from carpool.orchestrator.store.job_records import FINAL_STATES, GOOD_ENDS, JobState
from carpool.orchestrator.store.state_dir import find_state_dir, record_last_up, state_dir_for_up

CLUSTER_FILE = "cluster.json"


class ControllerNotRunningError(RuntimeError):
    """No controller is up for this state directory."""


class JobNotFinishedError(RuntimeError):
    pass


class Client:
    def __init__(self, state_dir: str | Path | None = None) -> None:
        """Talk to the carpool of `state_dir` (default: see `orchestrator.state_dir`)."""
        self.state_dir = find_state_dir(state_dir)
        self._controller = None
        self._cluster: dict | None = None
        self._dashboard_url: str | None = None
        self.created_token: Path | None = None  # set by `up` when it wrote Ray's auth token

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        config_path: str | Path | None = None,
        address: str | None = None,
        num_cpus: int | None = None,
        state_dir: str | Path | None = None,
    ) -> Client:
        """Start a local Ray head (or attach to `address`) and the controller. Idempotent.

        A `up` that fails leaves nothing behind: a head it started is stopped and
        no `cluster.json` is written.
        """
        config = load_operator_config(config_path)
        configured = config.state_dir if "state_dir" in config.model_fields_set else None
        config = config.model_copy(update={"state_dir": state_dir_for_up(state_dir, configured)})
        client = cls(config.state_dir)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        cluster = client._read_cluster()
        started = None
        if cluster is None or not client._reachable(cluster["address"]):
            if address is None:
                started = start_head(num_cpus)
                client.created_token = started.created_token
                address = started.address
            else:
                require_token(address)
            cluster = {
                "address": address,
                "started_ray": started is not None,
                "dashboard_url": started.dashboard_url if started else None,
                "config": config.model_dump(mode="json"),
            }
        try:
            client._start_controller(cluster)
        except BaseException:
            if started is not None:  # nothing half-up: our head goes, cluster.json stays unwritten
                client._disconnect()
                stop_cluster(started.address)
            raise
        record_last_up(config.state_dir)
        return client

    def _start_controller(self, cluster: dict) -> None:
        """(Re)create the controller if it is gone (a no-op if it runs); record the cluster."""
        self._attach(cluster)
        import ray
        from carpool.orchestrator.runtime.actor_names import CONTROLLER_NAME, NAMESPACE
        from carpool.orchestrator.runtime.controller_actor import CarpoolController

        if not cluster["dashboard_url"]:
            cluster["dashboard_url"] = self._dashboard_url
        ray.remote(CarpoolController).options(
            name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_concurrency=16,
            max_restarts=-1,
            num_cpus=0,
        ).remote(cluster["config"])
        ray.get(self.controller_handle().ping.remote())  # returns once the controller answers
        self._write_cluster(cluster)

    def down(self) -> None:
        """Stop the controller (checkpointing running jobs) and any Ray that `up` started."""
        cluster = self._read_cluster()
        if cluster is None:
            raise ControllerNotRunningError(f"no carpool is up for {self.state_dir}")
        import ray

        if self._reachable(cluster["address"]):
            self._attach(cluster)
            self._stop_serving(keep_serve_actors=bool(cluster.get("started_ray")))
            # It may already be gone; killing it (and stopping Ray) ends it anyway.
            with contextlib.suppress(Exception):
                ray.get(self.controller.shutdown.remote(), timeout=120)
            ray.kill(self.controller, no_restart=True)
            self._disconnect()
        if cluster.get("started_ray"):
            stop_cluster(cluster["address"])  # only ours: another Ray on this machine stays
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)
        self._controller = None

    def _stop_serving(self, keep_serve_actors: bool) -> None:
        """Remove `carpool serve`'s application, if it runs, and Serve's own actors unless
        `keep_serve_actors` (Ray itself is about to stop, and takes them quietly)."""
        from carpool.orchestrator.runtime.actor_names import SERVE_APP, SERVING_RECORD

        record = self.state_dir / SERVING_RECORD
        if record.is_file():
            from ray import serve

            with contextlib.suppress(Exception):  # Ray stopping ends it anyway
                serve.delete(SERVE_APP)
                if not keep_serve_actors:
                    serve.shutdown()
            record.unlink(missing_ok=True)

    # -- connection --------------------------------------------------------------------------
    def connect(self) -> None:
        """Attach this process to the carpool's Ray (as every call does on its own)."""
        cluster = self._read_cluster()
        if cluster is None or not self._reachable(cluster["address"]):
            raise ControllerNotRunningError(
                f"no carpool is up for {self.state_dir} (run `carpool up`)"
            )
        self._attach(cluster)

    def _read_cluster(self) -> dict | None:
        path = self.state_dir / CLUSTER_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def _write_cluster(self, cluster: dict) -> None:
        path = self.state_dir / CLUSTER_FILE
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(cluster, indent=2))
        staged.replace(path)  # atomic: never a half-written cluster.json

    @staticmethod
    def _reachable(address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                return True
        except (OSError, ValueError):
            return False

    def _attach(self, cluster: dict) -> None:
        import ray

        if not ray.is_initialized():
            context = ray.init(
                address=cluster["address"],
                namespace="carpool",
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
            url = context.dashboard_url
            self._dashboard_url = f"http://{url}" if url and "://" not in url else url
        self._cluster = cluster

    def _disconnect(self) -> None:
        import ray

        ray.shutdown()
        self._controller = None

    @property
    def controller(self):
        if self._controller is None:
            cluster = self._read_cluster()
            if cluster is None or not self._reachable(cluster["address"]):
                raise ControllerNotRunningError(
                    f"no carpool controller is up for {self.state_dir} (run `carpool up`)"
                )
            self._attach(cluster)
            self.controller_handle()
        return self._controller

    def controller_handle(self):
        """The controller actor of the Ray this client is attached to."""
        if self._controller is None:
            import ray
            from carpool.orchestrator.runtime.actor_names import CONTROLLER_NAME, NAMESPACE

            try:
                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            except ValueError as e:
                raise ControllerNotRunningError(
                    f"no carpool controller is up for {self.state_dir} (run `carpool up`)"
                ) from e
        return self._controller

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.controller, method).remote(*args))

    @property
    def config(self) -> OperatorConfig:
        cluster = self._cluster or self._read_cluster()
        if cluster is None:
            raise ControllerNotRunningError("no carpool controller is up (run `carpool up`)")
        return OperatorConfig.model_validate(cluster["config"])

    @property
    def dashboard_url(self) -> str | None:
        cluster = self._cluster or self._read_cluster()
        return cluster.get("dashboard_url") if cluster else None

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, spec_paths: Sequence[str | Path], notes: list | None = None) -> list[str]:
        """Validate every file (all problems at once, nothing queued on any), then queue them.

        Findings that are no error (rows to be truncated, values taken from init_from) go to `notes`.
        """
        from carpool.orchestrator.control.admission import check_admission
        from carpool.orchestrator.spec_check.validation import validate_files

        paths = [Path(p) for p in spec_paths]
        specs = validate_files(paths, notes)
        check_admission(specs, self.config, [str(p) for p in paths])
        return self._call("submit", [s.model_dump(mode="json") for s in specs])

    def status(self, job_id: str | None = None) -> list[dict]:
        if job_id is not None:
            validate_job_id(job_id)
        return self._call("status", job_id)

    def cancel(self, job_id: str) -> dict:
        return self._call("cancel", validate_job_id(job_id))

    def logs(self, job_id: str, since: int = 0) -> list[str]:
        """The job's log lines, skipping the first `since`."""
        return self._call("logs", validate_job_id(job_id), since)

    def history(self, job_id: str, since: int = 0) -> list[dict]:
        """The job's loss history (HF `log_history` entries), skipping the first `since`."""
        return self._call("history", validate_job_id(job_id), since)

    def follow_logs(self, job_id: str, poll_s: float = 0.5) -> Iterator[str]:
        """Every log line of the job as it is written, until the job is final."""
        seen = 0
        while True:
            # Read the state first: lines written before it turned final are then
            # all in the read that follows, so none is missed at the end.
            final = JobState(self.status(job_id)[0]["state"]) in FINAL_STATES
            lines = self.logs(job_id, since=seen)
            seen += len(lines)
            yield from lines
            if final:
                return
            time.sleep(poll_s)

    def wait(self, job_ids: Sequence[str], timeout: float | None = None) -> dict[str, str]:
        """Block until every job is final; returns {id: state}. TimeoutError past `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            states = {j: self.status(j)[0]["state"] for j in job_ids}
            if all(JobState(s) in FINAL_STATES for s in states.values()):
                return states
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished after {timeout}s: {states}")
            time.sleep(0.5)

    def fetch(self, job_id: str, out_dir: str | Path) -> Path:
        """Copy a finished job's PEFT adapter directory to `out_dir`."""
        record = self.status(job_id)[0]
        if JobState(record["state"]) not in GOOD_ENDS:  # a pruned trial keeps its adapter too
            raise JobNotFinishedError(
                f"job {job_id} is {record['state']}, not succeeded (or pruned)"
            )
        out = Path(out_dir)
        if out.exists():
            shutil.rmtree(out)
        return ArtifactStore(self.config.storage_root()).fetch_adapter(job_id, out)

    # -- sweeps ------------------------------------------------------------------------------
    def submit_sweep(self, path: str | Path) -> str:
        """Check a sweep file, its template and its whole space (every problem at once),
        then hand it to the controller, which queues its trials; returns its name."""
        from carpool.orchestrator.control.admission import check_admission
        from carpool.orchestrator.sweeps.sweep_spec import load_sweep_file, value_specs
        from carpool.workers.spec.job_spec import JobSpec

        loaded = load_sweep_file(Path(path))
        # The operator's limits, for the template and each value a trial may take.
        values = value_specs(loaded)
        specs = [JobSpec.model_validate(loaded.template)]
        specs += [JobSpec.model_validate(raw) for _, raw in values]
        sources = [str(path)] + [f"{path} {label}" for label, _ in values]
        check_admission(specs, self.config, sources)
        spec = loaded.spec.model_dump(mode="json")
        return self._call("submit_sweep", spec, loaded.template, str(loaded.path.resolve()))

    def sweep_status(self, name: str) -> dict:
        """{"sweep": the sweep's record, "trials": [each trial with its job's record]}."""
        return self._call("sweep_status", name)

    def cancel_sweep(self, name: str) -> list[str]:
        """No more trials; the sweep's queued and running trials are cancelled (their ids)."""
        return self._call("cancel_sweep", name)
