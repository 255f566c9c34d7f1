"""RayMetrics, with ray.util.metrics replaced by fakes that record what is set."""

from __future__ import annotations

import carpool.orchestrator.runtime.ray_runtime as ray_runtime
import pytest
from carpool.workers.training.rounds import JobRoundResult


class FakeMetric:
    def __init__(self, made: dict, name: str, description: str = "", tag_keys=()) -> None:
        made[name] = self
        self.tag_keys = tuple(tag_keys)
        self.values: list[tuple[float, dict | None]] = []

    def set(self, value: float, tags: dict | None = None) -> None:
        self.values.append((value, tags))

    inc = set


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeMetric]:
    made: dict[str, FakeMetric] = {}
    for kind in ("Gauge", "Counter"):
        monkeypatch.setattr(
            ray_runtime.ray_metrics, kind, lambda *a, **k: FakeMetric(made, *a, **k)
        )
    return made


def result(step: int, **fields) -> JobRoundResult:
    return JobRoundResult(
        job="j1", step=step, total_steps=3, loss=1.5, tokens=10, tokens_per_second=100.0,
        tokens_seen=10 * step, learning_rate=2e-4 * step, grad_norm=0.25 * step, **fields,
    )  # fmt: skip


def test_each_step_sets_learning_rate_and_grad_norm_gauges_by_job_and_group(made) -> None:
    metrics = ray_runtime.RayMetrics(interval_s=0)
    metrics.job_progress("j1", "g1", result(1))
    metrics.job_progress("j1", "g1", result(2))

    tags = {"job": "j1", "group": "g1"}
    for name, per_step in [("carpool_job_learning_rate", 2e-4), ("carpool_job_grad_norm", 0.25)]:
        assert made[name].tag_keys == ("job", "group")
        assert made[name].values == [(per_step, tags), (2 * per_step, tags)]


def test_throttled_steps_are_skipped_but_the_last_is_pushed(made) -> None:
    metrics = ray_runtime.RayMetrics(interval_s=3600)
    for step in (1, 2, 3):
        metrics.job_progress("j1", "g1", result(step))

    tags = {"job": "j1", "group": "g1"}
    pushed = made["carpool_job_grad_norm"].values
    assert len(pushed) < 3 and pushed[-1] == (0.75, tags)  # the finished step is never skipped
    assert sum(n for n, _ in made["carpool_job_tokens_total"].values) == 30  # no token lost


def test_a_finished_jobs_last_eval_loss_is_set_again_with_the_queue_state(made) -> None:
    metrics = ray_runtime.RayMetrics(interval_s=0)
    metrics.job_progress("j1", "g1", result(3, eval_loss=0.5))  # its last round
    metrics.queue_state({ray_runtime.JobState.QUEUED: 0})
    metrics.queue_state({ray_runtime.JobState.QUEUED: 0})
    tags = {"job": "j1", "group": "g1"}
    assert made["carpool_job_eval_loss"].values == [(0.5, tags)] * 3


def test_a_preference_jobs_reward_figures_are_gauges_with_ray_safe_names(made) -> None:
    metrics = ray_runtime.RayMetrics(interval_s=0)
    figures = {"rewards/margins": 0.5, "rewards/accuracies": 0.75, "logps/chosen": -3.0, "kl": 0.2}
    metrics.job_progress("j1", "g1", result(1, metrics=figures))
    metrics.job_progress("j1", "g1", result(2))  # a supervised step sets none
    tags = {"job": "j1", "group": "g1"}
    assert made["carpool_job_rewards_margins"].values == [(0.5, tags)]
    assert made["carpool_job_rewards_accuracies"].values == [(0.75, tags)]
    assert made["carpool_job_kl"].values == [(0.2, tags)]
    assert all("/" not in name for name in made)
