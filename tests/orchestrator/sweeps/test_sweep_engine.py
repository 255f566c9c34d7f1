"""A seeded grid sweep over real training on a tiny base equals its trials run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.control.controller import Controller
from carpool.orchestrator.control.local_group import LocalGroupFactory
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import JobState
from carpool.orchestrator.sweeps.sweep_spec import load_sweep_file, trial_spec
from carpool.workers.spec.job_spec import JobSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import run_round

from tests.helpers.fake_groups import FakeCheckpoints
from tests.orchestrator.sweeps.sweep_files import write_sweep


def sweep_file(root: Path, base: Path, datasets: dict[str, Path]) -> Path:
    return write_sweep(
        root,
        base,
        datasets["text"],
        datasets["prompt_completion"],
        {"max_steps": 4, "eval_steps": 2, "max_seq_length": 32},
        name="real",
        parameters={
            "training.learning_rate": {"choices": [1.0e-4, 3.0e-3, 3.0e-2]},
            "adapter.r": {"choices": [2, 4]},
        },
        trials=6,
        sampler="grid",
        seed=7,
        max_concurrent=3,
    )


def alone(spec: dict) -> float:
    """The trial's best eval loss, trained by itself on an engine of its own."""
    engine = Engine(spec["base_model"], device="cpu")
    engine.add_job(JobSpec.model_validate(spec))
    evals = []
    while engine.active_jobs():
        evals += [r.eval_loss for r in run_round(engine, None) if r.eval_loss is not None]
    return min(evals)


def test_grid_sweep_equals_its_trials_run_one_by_one(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    path = sweep_file(tmp_path, tiny_base, datasets)
    loaded = load_sweep_file(path)
    queue = JobQueue(tmp_path / "state" / "queue.sqlite")
    controller = Controller(
        queue,
        OperatorConfig.model_validate({}),
        LocalGroupFactory(tmp_path / "groups"),
        free_group_slots=lambda running: 1 - running,
        checkpoints=FakeCheckpoints(queue),
    )
    controller.submit_sweep(loaded.spec.model_dump(mode="json"), loaded.template, str(path))
    for _ in range(100):
        controller.tick()
        if queue.sweep("real").state != "running":
            break
    trials = queue.trials("real")
    assert queue.sweep("real").state == "done" and len(trials) == 6
    assert all(t.job.state == JobState.SUCCEEDED for t in trials)
    # Trials rode together (up to 3 in one group) yet each equals its own run alone.
    for t in trials:
        assert t.best == pytest.approx(alone(trial_spec(loaded, t.number, t.params)), rel=1e-5)
    best_fused = min(trials, key=lambda t: t.best)
    best_alone = min(trials, key=lambda t: alone(trial_spec(loaded, t.number, t.params)))
    assert best_fused.number == best_alone.number
    assert len({round(t.best, 4) for t in trials}) > 1  # the parameters matter
    queue.close()
