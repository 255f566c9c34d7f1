"""`make test`'s lanes: tests on Ray together, every other module a unit of its own."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.xdist_lanes import RAY_FILES, RAY_LANE, lane_of

ROOT = Path(__file__).parent.parent


def test_each_ray_file_exists_and_its_tests_share_the_ray_lane() -> None:
    for path in RAY_FILES:
        assert (ROOT / path).is_file(), path
        assert lane_of(f"{path}::test_x[a::b]") == RAY_LANE


def test_other_tests_go_module_by_module() -> None:
    nodeid = "tests/workers/bank/test_grouped_lora.py::test_x[loop]"
    assert lane_of(nodeid) == "tests/workers/bank/test_grouped_lora.py"
