"""Job ids: generated from the job's name, validated wherever one comes in.

Ids become file and URI path segments (artifacts, checkpoints, logs), so
nothing but this narrow pattern may pass: no '/', no '..', no upper case.
"""

from __future__ import annotations

import re
import uuid

JOB_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,80}")


class InvalidJobIdError(ValueError):
    """A string that is not a carpool job id."""


def new_job_id(name: str) -> str:
    return validate_job_id(f"{name}-{uuid.uuid4().hex[:8]}")


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidJobIdError(
            f"invalid job id {job_id!r}: want 1-81 characters of [a-z0-9_-], "
            "starting with a letter or digit"
        )
    return job_id
