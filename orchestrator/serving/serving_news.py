"""The controller's news for a running endpoint: a job succeeded, serve its adapter.

Light on purpose (Ray Serve is imported only when an endpoint runs): the controller
actor imports this module when it starts.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from carpool.orchestrator.runtime.actor_names import SERVE_APP, SERVING_RECORD

log = logging.getLogger("carpool.serve")


def tell_of_success(state_dir: Path, job_id: str) -> None:
    """Tell the running endpoint (if any) that a job succeeded; never blocks the caller."""
    if not (state_dir / SERVING_RECORD).is_file():
        return

    def tell() -> None:
        from ray import serve

        try:
            serve.get_app_handle(SERVE_APP).register_job.remote(job_id).result(timeout_s=60)
        except Exception as e:  # stopped or starting: it reads the queue when it starts
            log.warning("could not tell the serving app of job %s: %s", job_id, e)

    threading.Thread(target=tell, name="carpool-tell-serving", daemon=True).start()
