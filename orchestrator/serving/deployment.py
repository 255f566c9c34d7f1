"""Deploying the serving application on the cluster, stopping it, and telling it news.

One Ray Serve application, `carpool`: an ingress and one `BaseServer` deployment
per (base, quantization) served: the bases of the queue's succeeded jobs and the
one `--base` names. Running `carpool serve` again redeploys it (a base whose jobs
succeeded since then gains its deployment).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from dataclasses import asdict
from pathlib import Path

import ray
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.runtime.actor_names import SERVE_APP, SERVING_RECORD
from carpool.orchestrator.serving.adapter_catalog import AdapterCatalog
from carpool.orchestrator.serving.adapter_sources import directory_version, succeeded_jobs
from carpool.orchestrator.serving.base_server import base_server_deployment
from carpool.orchestrator.serving.ingress import Ingress
from ray import serve

log = logging.getLogger("carpool.serve")


def ensure_key(path: Path) -> Path:
    """The bearer key's file, created (mode 0600) when missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def read_key(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path}: the serving key file is empty")
    return key


def deploy(
    config: OperatorConfig,
    base_model: str | None = None,
    adapters: dict[str, Path] | None = None,
    quantization: dict | None = None,
) -> dict:
    """Deploy (or redeploy) the application; returns its record (url, key file, bases).

    The caller is attached to the cluster. `adapters` ({name: dir}) serve on `base_model`.
    """
    catalog = AdapterCatalog()
    for job in succeeded_jobs(config):
        catalog.add_base(job.base_model, job.quantization)
    directories = []
    if base_model is not None:
        named = catalog.add_base(base_model, quantization)
        directories = [
            asdict(directory_version(name, path, named.key))
            for name, path in (adapters or {}).items()
        ]
    if not catalog.bases:
        raise ValueError("nothing to serve: no job has succeeded yet; name a --base to serve")
    settings = config.serve
    gpu = config.uses_gpu(ray.cluster_resources().get("GPU", 0))
    options = {
        "threads": settings.cpus_per_replica,
        "max_batch_rows": settings.max_batch_rows,
        "stream_interval_s": settings.stream_interval_s,
        "adapter_math": config.adapter_math,
        "trust_remote_code": config.trust_remote_code,
        "device": "cuda" if gpu else "cpu",
    }
    server_cls = base_server_deployment(settings.max_adapters_per_replica)
    servers = {
        key: server_cls.options(
            name=key,
            num_replicas=settings.replicas,
            max_ongoing_requests=settings.max_batch_rows,
            ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": 1 if gpu else 0},
        ).bind(key, base.base_model, base.quantization, options)
        for key, base in catalog.bases.items()
    }
    key_file = ensure_key(config.serve_key_file())
    key_sha256 = hashlib.sha256(read_key(key_file).encode()).hexdigest()
    bases = [
        {"base_model": b.base_model, "quantization": b.quantization} for b in catalog.bases.values()
    ]
    app = Ingress.options(name="ingress", ray_actor_options={"num_cpus": 0}).bind(
        servers, bases, directories, config.model_dump(mode="json"), key_sha256
    )
    # Serve's own INFO lines ("Started Serve", "Connecting to existing Serve app") tell
    # the user nothing to do; its warnings still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(app, name=SERVE_APP, route_prefix="/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    record = {
        "url": f"http://{host}:{settings.port}/v1",
        "key_file": str(key_file),
        "bases": [b["base_model"] for b in bases],
    }
    path = config.state_dir / SERVING_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def stop(state_dir: Path) -> bool:
    """Remove the application and Serve's own actors; False when none was recorded."""
    recorded = (state_dir / SERVING_RECORD).is_file()
    serve.shutdown()
    (state_dir / SERVING_RECORD).unlink(missing_ok=True)
    return recorded
