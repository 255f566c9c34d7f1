"""The smoke runs of the benchmark scripts that take `--address`: on the suite's Ray head,
with no head of their own to start (the soak's smoke run kills nothing)."""

from __future__ import annotations

import pytest

from tests.helpers.benchmark_smoke import ATTACHED, run_smallest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("script", sorted(ATTACHED))
def test_each_benchmark_on_ray_runs_at_its_smallest_size(script: str, shared_ray_head: str) -> None:
    run_smallest(script, shared_ray_head)
