"""Sweeps on the controller loop: trials queued as jobs, told to the search, pruned, resumed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import FINAL_STATES, JobState
from carpool.orchestrator.sweeps.sweep_spec import load_sweep_file
from carpool.workers.spec.job_spec import JobSpec

from tests.helpers.fake_groups import FakeGroupFactory, make_controller, run_to_end
from tests.orchestrator.sweeps.sweep_files import write_sweep

RATES = [1.0e-5, 1.0e-4, 1.0e-3, 1.0e-2]


def lr_quality(config: JobSpec) -> float:
    """The fake's eval loss factor: 1 at lr 1e-3, one more per decade away from it."""
    return 1.0 + abs(math.log10(config.training.learning_rate) + 3)


def lr_sweep(root: Path, base: Path, datasets: dict[str, Path], **overrides) -> Path:
    """A grid over 4 rates x 2 ranks, 3 trials at a time; 6 steps, an eval after each."""
    sweep = {
        "name": "lr-sweep",
        "parameters": {
            "training.learning_rate": {"choices": RATES},
            "adapter.r": {"choices": [4, 8]},
        },
        "trials": 8,
        "sampler": "grid",
        "seed": 0,
        "max_concurrent": 3,
        **overrides,
    }
    training = {"max_steps": 6, "eval_steps": 1, "max_seq_length": 32}
    return write_sweep(
        root, base, datasets["text"], datasets["one_row"], training, {"r": 4}, **sweep
    )


@pytest.fixture
def queue(tmp_path: Path):
    q = JobQueue(tmp_path / "state" / "queue.sqlite")
    yield q
    q.close()


@pytest.fixture
def factory() -> FakeGroupFactory:
    f = FakeGroupFactory()
    f.eval_scale = lr_quality
    return f


def submit(controller, path: Path) -> str:
    loaded = load_sweep_file(path)
    return controller.submit_sweep(
        loaded.spec.model_dump(mode="json"), loaded.template, str(loaded.path)
    )


def tick_to_end(controller, queue: JobQueue, name: str, max_ticks: int = 200) -> list[int]:
    """Tick until the sweep is no longer running; the trials alive after each tick."""
    alive = []
    for _ in range(max_ticks):
        controller.tick()
        trials = queue.trials(name)
        alive.append(sum(1 for t in trials if t.job.state not in FINAL_STATES))
        if queue.sweep(name).state != "running":
            return alive
    raise AssertionError(f"sweep {name} still running after {max_ticks} ticks")


def test_a_grid_sweep_runs_every_point_once_at_most_max_concurrent_at_a_time(
    queue, factory, tiny_base, datasets, tmp_path
) -> None:
    controller = make_controller(queue, factory, max_adapters_per_group=8)
    name = submit(controller, lr_sweep(tmp_path, tiny_base, datasets))
    alive = tick_to_end(controller, queue, name)
    assert max(alive) == 3  # the places were filled, and never more
    trials = queue.trials(name)
    assert [t.number for t in trials] == list(range(8))
    points = {(t.params["training.learning_rate"], t.params["adapter.r"]) for t in trials}
    assert points == {(lr, r) for lr in RATES for r in (4, 8)}
    assert all(t.job.state == JobState.SUCCEEDED and t.told for t in trials)
    assert all(t.job.name == f"lr-sweep-t{t.number:02d}" for t in trials)
    # Each trial's job ran with its own parameters, and its best eval is the fake's.
    for t in trials:
        spec = JobSpec.model_validate(t.job.spec)
        assert spec.training.learning_rate == t.params["training.learning_rate"]
        assert spec.adapter.r == t.params["adapter.r"]
        assert t.best == pytest.approx(lr_quality(spec) * 2.0 / 6)
    best = min(trials, key=lambda t: t.best)
    assert best.params["training.learning_rate"] == 1.0e-3
    assert controller.sweeps.search(queue.sweep(name)).best()[1] == pytest.approx(best.best)


def test_pruning_stops_the_worst_trials_and_never_the_best(
    queue, factory, tiny_base, datasets, tmp_path
) -> None:
    # One trial at a time: from the second on, each is judged against those before it.
    path = lr_sweep(
        tmp_path,
        tiny_base,
        datasets,
        max_concurrent=1,
        pruner="median",
        pruner_options={"n_startup_trials": 1, "n_warmup_steps": 1},
    )
    controller = make_controller(queue, factory)
    name = submit(controller, path)
    tick_to_end(controller, queue, name)
    trials = queue.trials(name)
    by_state = {s: [t for t in trials if t.job.state == s] for s in JobState}
    assert len(trials) == 8 and len(by_state[JobState.PRUNED]) >= 2
    # The best rate is never pruned; the worst (two decades off) never runs to the end twice.
    assert all(t.job.state == JobState.SUCCEEDED for t in trials if lr(t) == 1.0e-3)
    assert sum(1 for t in by_state[JobState.SUCCEEDED] if lr(t) == 1.0e-5) <= 1
    for t in by_state[JobState.PRUNED]:
        assert t.job.step < 6 and "pruned at step" in "\n".join(queue.logs(t.job.id))
        assert factory.calls("stop_job", t.job.id)  # its adapter exported as it stood
        assert queue.history(t.job.id)  # and its history kept
        assert t.told
    best = controller.sweeps.search(queue.sweep(name)).best()
    assert best is not None and lr(trials[best[0]]) == 1.0e-3


def lr(trial) -> float:
    return trial.params["training.learning_rate"]


def test_a_sweep_survives_a_controller_restart(
    queue, factory, tiny_base, datasets, tmp_path
) -> None:
    controller = make_controller(queue, factory, max_adapters_per_group=8)
    name = submit(controller, lr_sweep(tmp_path, tiny_base, datasets))
    for _ in range(5):
        controller.tick()
    before = {t.number: t.params for t in queue.trials(name)}
    assert 0 < len(before) < 8
    controller.shutdown()  # running trials back to the queue, from their checkpoints
    restarted = make_controller(queue, factory, max_adapters_per_group=8)
    tick_to_end(restarted, queue, name)
    trials = queue.trials(name)
    assert {t.number: t.params for t in trials if t.number in before} == before
    points = {(t.params["training.learning_rate"], t.params["adapter.r"]) for t in trials}
    assert len(trials) == len(points) == 8  # the grid, each point once, across the restart
    assert all(t.job.state == JobState.SUCCEEDED for t in trials)


def test_cancelling_a_sweep_cancels_its_trials_and_queues_no_more(
    queue, factory, tiny_base, datasets, tmp_path
) -> None:
    controller = make_controller(queue, factory, max_adapters_per_group=8)
    name = submit(controller, lr_sweep(tmp_path, tiny_base, datasets))
    controller.tick()
    cancelled = controller.sweeps.cancel(name)
    assert len(cancelled) == 3
    run_to_end(controller)
    assert queue.sweep(name).state == "cancelled"
    assert len(queue.trials(name)) == 3
    assert all(t.job.state == JobState.CANCELLED for t in queue.trials(name))


def test_a_sweep_name_is_taken_once(queue, factory, tiny_base, datasets, tmp_path) -> None:
    from carpool.orchestrator.store.job_records import SweepExistsError

    controller = make_controller(queue, factory)
    path = lr_sweep(tmp_path, tiny_base, datasets)
    submit(controller, path)
    with pytest.raises(SweepExistsError, match="lr-sweep"):
        submit(controller, path)
