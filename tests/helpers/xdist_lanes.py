"""How `make test` shares this machine's cores between two pytest-xdist workers.

The tests on Ray (the suite's shared head, or heads of their own) run in one lane, in file
order: one head serves them, no two clusters compete for the cores, and the lane starts
first because it is the longest. Every other test module goes, whole (its fixtures built
once), to whichever worker is free. Most tests spend their time in one Python thread
(imports, Ray actors starting, small tensors): on a 2-core machine the suite took 1145 s
in one process and 691 s in two lanes, one after the other. xdist's own
`--dist loadgroup` would do this from `xdist_group` marks, but with pytest 9 it silently
stops grouping (pytest-xdist#1386), hence a scheduler of our own."""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

RAY_LANE = "ray"
# Every test file with a test on Ray (tests/conftest.py refuses one elsewhere).
RAY_FILES = frozenset(
    {
        "tests/orchestrator/runtime/test_benchmarks_on_ray_integration.py",
        "tests/orchestrator/runtime/test_first_run_integration.py",
        "tests/orchestrator/runtime/test_group_integration.py",
        "tests/orchestrator/runtime/test_load_integration.py",
        "tests/orchestrator/runtime/test_local_ray_integration.py",
        "tests/orchestrator/runtime/test_orchestrator_integration.py",
        "tests/orchestrator/runtime/test_qlora_integration.py",
        "tests/orchestrator/runtime/test_reliability_integration.py",
        "tests/orchestrator/serving/test_serve_endpoint.py",
        "tests/orchestrator/sweeps/test_sweep_integration.py",
    }
)


def lane_of(nodeid: str) -> str:
    """The unit a worker takes whole: the Ray lane, or the test's own module."""
    module = nodeid.split("::", 1)[0]
    return RAY_LANE if module in RAY_FILES else module


class RayTestsInOneLane(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return lane_of(nodeid)

    def _assign_work_unit(self, node: WorkerController) -> None:
        if RAY_LANE in self.workqueue:  # the longest unit first
            self.workqueue.move_to_end(RAY_LANE, last=False)
        super()._assign_work_unit(node)
