"""What a sweep tries next and what it stops early: Optuna's samplers and pruners, ask-and-tell.

The controller asks for a trial, runs it as an ordinary job, reports its eval
losses as they come and tells how it ended. The study lives in a journal file,
so a restarted controller reloads it and carries on: trial numbers continue,
and trials asked before the restart can still report and finish.

Optuna rather than Ray Tune: Tune runs each trial as its own trainable and its
schedulers stop them there, while a sweep's trials are queue jobs that the
controller packs into fused groups; ask-and-tell leaves that loop to carpool.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from carpool.orchestrator.sweeps.pruners import PRUNERS
from carpool.orchestrator.sweeps.sweep_spec import (
    ChoiceSpace,
    RangeSpace,
    SweepSpec,
    encoded_choice,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

# One line per trial at INFO would flood the controller's log.
optuna.logging.set_verbosity(optuna.logging.WARNING)


def pruner_for(spec: SweepSpec) -> optuna.pruners.BasePruner:
    return PRUNERS[spec.pruner](**spec.pruner_options)


def distribution_for(space: RangeSpace | ChoiceSpace) -> BaseDistribution:
    if isinstance(space, ChoiceSpace):
        return CategoricalDistribution([encoded_choice(v) for v in space.choices])
    if space.is_int:
        return IntDistribution(int(space.low), int(space.high), log=space.log, step=space.step or 1)
    return FloatDistribution(float(space.low), float(space.high), log=space.log, step=space.step)


def grid_search_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """Each parameter's grid values, as Optuna holds them (list choices encoded)."""
    grid: dict[str, list[Any]] = {}
    for path, space in spec.parameters.items():
        if isinstance(space, ChoiceSpace):
            grid[path] = [encoded_choice(v) for v in space.choices]
        else:
            grid[path] = space.grid_points()
    return grid


def sampler_for(spec: SweepSpec, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sweep's sampler. Reloaded with trials already asked, a random or TPE sampler is
    seeded past them: seeded as at the start, it would draw its first values again."""
    if spec.sampler == "grid":
        # Always the sweep's own seed: trial n takes the n-th point of the grid shuffled by
        # the seed, so another seed after a restart would hand out points again.
        return optuna.samplers.GridSampler(grid_search_space(spec), seed=spec.seed)
    seed = spec.seed + trials_so_far
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed)


class SweepSearch:
    """One sweep's Optuna study, persisted in a JournalStorage file so it survives a
    controller restart."""

    def __init__(self, spec: SweepSpec, storage_path: Path) -> None:
        storage = JournalStorage(JournalFileBackend(str(storage_path)))
        self._study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            direction="minimize",  # eval_loss
            pruner=pruner_for(spec),
            load_if_exists=True,
        )
        self._study.sampler = sampler_for(spec, len(self._study.get_trials(deepcopy=False)))
        self._distributions = {p: distribution_for(s) for p, s in spec.parameters.items()}
        # Encoded choice -> the value the spec gave (a list of module names, say).
        self._decode = {
            path: {encoded_choice(v): v for v in space.choices}
            for path, space in spec.parameters.items()
            if isinstance(space, ChoiceSpace)
        }

    def ask(self) -> tuple[int, dict[str, Any]]:
        """A new trial: its number and its values by dotted path (list choices as lists)."""
        trial = self._study.ask(self._distributions)
        params = {
            path: self._decode[path][value] if path in self._decode else value
            for path, value in trial.params.items()
        }
        return trial.number, params

    def report(self, number: int, step: int, value: float) -> bool:
        """Record trial `number`'s eval value at `step`; True if the pruner says stop it now."""
        trial, reported = self._running_trial(number)
        # A resumed job may evaluate a step again: the first value stands (Optuna would warn).
        if step not in reported:
            trial.report(value, step)
        return trial.should_prune()

    def complete(self, number: int, value: float) -> None:
        self._tell(number, values=value)

    def pruned(self, number: int) -> None:
        self._tell(number, state=TrialState.PRUNED)

    def failed(self, number: int) -> None:
        self._tell(number, state=TrialState.FAIL)

    def _tell(self, number: int, **outcome: Any) -> None:
        """Tell a trial's end once: telling it again (a restart between telling and
        recording that it was told) is a no-op."""
        if self._study.get_trials(deepcopy=False)[number].state.is_finished():
            return
        try:
            self._study.tell(number, **outcome)
        except RuntimeError as e:
            # The grid sampler stops the study once its last point is told; outside
            # `optimize` Optuna raises for that stop, after the trial was recorded.
            if "Study.stop" not in str(e):
                raise

    def best(self) -> tuple[int, float] | None:
        """The best completed trial's (number, value); pruned trials stopped short and do not
        count. None before any trial completed."""
        done = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        best = min(done, key=lambda t: t.value)
        return best.number, best.value

    def _running_trial(self, number: int) -> tuple[optuna.trial.Trial, set[int]]:
        """Trial `number` and the steps it has reported."""
        # Optuna hands out Trial objects only from ask(); a trial asked before a reload is
        # rebuilt from its storage id. The one place that reaches into Optuna's internals.
        study, storage = self._study, self._study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        reported = set(storage.get_trial(trial_id).intermediate_values)
        return optuna.trial.Trial(study, trial_id), reported
