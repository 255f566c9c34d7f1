"""A sweep's Optuna study: seeded sampling, pruning by reports, and a reload from its journal."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from carpool.orchestrator.sweeps.sweep_search import SweepSearch, pruner_for, sampler_for
from carpool.orchestrator.sweeps.sweep_spec import SweepSpec

TARGETS = [["q_proj", "v_proj"], "all-linear"]


def spec(**overrides: object) -> SweepSpec:
    raw: dict = {
        "name": "sw",
        "template": "job.yaml",
        "parameters": {
            "training.learning_rate": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
            "adapter.r": {"choices": [4, 8, 16]},
            "adapter.target_modules": {"choices": TARGETS},
        },
        "trials": 12,
    }
    raw.update(overrides)
    return SweepSpec.model_validate(raw)


def grid_spec() -> SweepSpec:
    return spec(
        sampler="grid",
        seed=7,
        parameters={
            "adapter.r": {"choices": [4, 8, 16]},
            "adapter.target_modules": {"choices": TARGETS},
            "training.learning_rate": {"low": 0.1, "high": 0.3, "step": 0.1},
        },
        trials=18,
    )


def test_asked_values_are_decoded_and_in_the_space(tmp_path: Path) -> None:
    search = SweepSearch(spec(), tmp_path / "sw.journal")
    for expected in range(5):
        number, params = search.ask()
        assert number == expected
        assert set(params) == {"training.learning_rate", "adapter.r", "adapter.target_modules"}
        assert 1e-5 <= params["training.learning_rate"] <= 1e-3
        assert params["adapter.r"] in (4, 8, 16)
        assert params["adapter.target_modules"] in TARGETS  # a list comes back as a list


def test_seeded_grid_asks_the_same_trials_in_the_same_order(tmp_path: Path) -> None:
    first = SweepSearch(grid_spec(), tmp_path / "a.journal")
    second = SweepSearch(grid_spec(), tmp_path / "b.journal")
    asked = [first.ask() for _ in range(18)]
    assert asked == [second.ask() for _ in range(18)]
    # Every point once, although none of them finished.
    points = {
        (p["adapter.r"], str(p["adapter.target_modules"]), p["training.learning_rate"])
        for _, p in asked
    }
    assert len(points) == 18
    assert {p["training.learning_rate"] for _, p in asked} == {0.1, 0.2, 0.3}


def run_trial(search: SweepSearch, losses: list[float]) -> int:
    """A trial that reports `losses` at steps 1, 2, ... and completes (whatever the pruner says)."""
    number, _ = search.ask()
    for step, loss in enumerate(losses, start=1):
        search.report(number, step, loss)
    search.complete(number, losses[-1])
    return number


@pytest.mark.parametrize(
    ("pruner", "options"),
    [
        ("median", {"n_startup_trials": 2}),
        ("successive_halving", {"min_resource": 1, "reduction_factor": 2}),
    ],
)
def test_a_clearly_worse_trial_is_pruned(tmp_path: Path, pruner: str, options: dict) -> None:
    search = SweepSearch(spec(pruner=pruner, pruner_options=options), tmp_path / "sw.journal")
    for offset in (0.0, 0.1, 0.2, 0.3):
        run_trial(search, [1.0 + offset, 0.8 + offset, 0.6 + offset, 0.5 + offset])
    good, _ = search.ask()
    assert not search.report(good, 1, 0.9)
    worse, _ = search.ask()
    assert search.report(worse, 1, 5.0)
    search.pruned(worse)
    assert search.best() == (0, 0.5)


def test_no_pruner_never_prunes(tmp_path: Path) -> None:
    search = SweepSearch(spec(), tmp_path / "sw.journal")
    run_trial(search, [1.0, 0.5])
    number, _ = search.ask()
    assert not search.report(number, 1, 100.0)
    assert isinstance(pruner_for(spec()), optuna.pruners.NopPruner)


def test_reload_keeps_numbering_reports_and_best(tmp_path: Path) -> None:
    journal = tmp_path / "sw.journal"
    sweep = spec(pruner="median", pruner_options={"n_startup_trials": 1})
    search = SweepSearch(sweep, journal)
    assert search.best() is None
    first = run_trial(search, [1.0, 0.7])
    running, _ = search.ask()
    assert not search.report(running, 1, 0.9)
    doomed, _ = search.ask()

    reloaded = SweepSearch(sweep, journal)  # a restarted controller
    assert reloaded.best() == (first, 0.7)
    assert not reloaded.report(running, 1, 50.0)  # a step reported again: the first value stands
    assert not reloaded.report(running, 2, 0.4)  # a trial asked before the reload still reports
    reloaded.complete(running, 0.4)
    assert reloaded.report(doomed, 1, 9.0)
    reloaded.pruned(doomed)
    number, _ = reloaded.ask()
    assert number == 3
    reloaded.failed(number)
    assert reloaded.best() == (running, 0.4)
    states = [t.state for t in optuna.load_study(study_name="sw", storage=_storage(journal)).trials]
    assert states == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    ]


def test_a_reloaded_sampler_does_not_draw_its_first_values_again(tmp_path: Path) -> None:
    for sampler in ("random", "tpe"):
        sweep = spec(sampler=sampler, name=f"sw-{sampler}")
        journal = tmp_path / f"{sampler}.journal"
        _, first = SweepSearch(sweep, journal).ask()
        _, after_reload = SweepSearch(sweep, journal).ask()
        assert after_reload["training.learning_rate"] != first["training.learning_rate"]
    assert isinstance(sampler_for(grid_spec(), 0), optuna.samplers.GridSampler)
    assert isinstance(sampler_for(spec(), 3), optuna.samplers.TPESampler)


def _storage(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))
