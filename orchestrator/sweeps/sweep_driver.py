"""Sweeps on the controller's loop: the search decides, the queue runs ordinary jobs.

Once per controller tick, after the rounds, for each running sweep:
  1. each unfinished trial's new history entries go to the search (`SweepSearch`);
     an eval the pruner rejects stops the trial, which ends `pruned`;
  2. a trial's job that ended is told to the search once (its best metric when it
     succeeded; pruned; failed for a failure or a cancel);
  3. free places (`max_concurrent`) are filled with new trials, asked of the search
     and queued as jobs named `<sweep>-tNN`, until `trials` were asked;
  4. a sweep whose trials were all asked and all ended is done.

Everything the search was told is recorded per trial in the queue (how many history
entries, the best metric, whether its end was told), and the search's own state is
Optuna's journal file beside the queue: after a controller restart, each sweep
resumes where its records say.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.store.job_records import FINAL_STATES, JobState, SweepRecord, TrialRecord
from carpool.orchestrator.sweeps.sweep_spec import LoadedSweep, SweepSpec, trial_spec

if TYPE_CHECKING:
    from carpool.orchestrator.sweeps.sweep_search import SweepSearch

log = logging.getLogger("carpool.sweeps")

RUNNING, DONE, CANCELLED = "running", "done", "cancelled"


class SweepMetrics(Protocol):
    def sweep_progress(self, sweep: str, trials: list[TrialRecord]) -> None: ...


class SweepDriver:
    def __init__(
        self,
        queue: JobQueue,
        journal: Path,
        prune_job: Callable[[str, str], None],
        metrics: SweepMetrics | None = None,
    ) -> None:
        """`prune_job(job_id, reason)` stops a running trial and ends it `pruned`;
        `metrics` is told each running sweep's trials once per tick."""
        self.queue = queue
        self.journal = journal
        self.prune_job = prune_job
        self.metrics = metrics
        self._searches: dict[str, SweepSearch] = {}

    def tick(self) -> bool:
        """Advance every running sweep; True if any trial was queued or pruned."""
        changed = False
        for sweep in self.queue.sweeps([RUNNING]):
            try:
                changed |= self._advance(sweep)
            except Exception:  # one sweep's trouble must not stop the loop or the others
                log.exception("[sweep %s] cannot advance", sweep.name)
        return changed

    def search(self, sweep: SweepRecord) -> SweepSearch:
        if sweep.name not in self._searches:
            from carpool.orchestrator.sweeps.sweep_search import (
                SweepSearch,  # optuna: only with sweeps
            )

            spec = SweepSpec.model_validate(sweep.spec)
            self._searches[sweep.name] = SweepSearch(spec, self.journal)
        return self._searches[sweep.name]

    def _advance(self, sweep: SweepRecord) -> bool:
        spec = SweepSpec.model_validate(sweep.spec)
        search = self.search(sweep)
        changed = False
        for trial in self.queue.trials(sweep.name):
            if not trial.told:
                changed |= self._follow(sweep, search, trial)
        trials = self.queue.trials(sweep.name)
        live = sum(1 for t in trials if t.job.state not in FINAL_STATES)
        for _ in range(min(spec.max_concurrent - live, spec.trials - len(trials))):
            self._queue_trial(sweep, spec, search)
            changed = True
        trials = self.queue.trials(sweep.name)
        if self.metrics is not None:
            self.metrics.sweep_progress(sweep.name, trials)
        if len(trials) >= spec.trials and all(t.told for t in trials):
            self.queue.set_sweep_state(sweep.name, DONE)
            log.info("[sweep %s] done; best trial (number, value): %s", sweep.name, search.best())
        return changed

    def _follow(self, sweep: SweepRecord, search: SweepSearch, trial: TrialRecord) -> bool:
        """Tell the search the trial's new evals, prune it if asked, tell its end once."""
        entries = self.queue.history(trial.job.id, since=trial.reported)
        best, prune = trial.best, False
        for entry in entries:
            value = entry.get("eval_loss")
            if value is None or not math.isfinite(value):
                continue
            best = value if best is None else min(best, value)
            prune |= search.report(trial.number, int(entry["step"]), float(value))
        job = self.queue.get(trial.job.id)
        pruned_now = False
        if prune and job.state == JobState.RUNNING and not job.cancel_requested:
            self.prune_job(job.id, f"pruned by the sweep's {sweep.spec['pruner']} pruner")
            job, pruned_now = self.queue.get(job.id), True
        told = job.state in FINAL_STATES
        if told:
            self._tell_end(search, trial.number, job.state, best)
        self.queue.update_trial(
            sweep.name, trial.number, reported=trial.reported + len(entries), best=best, told=told
        )
        return pruned_now

    @staticmethod
    def _tell_end(search: SweepSearch, number: int, state: JobState, best: float | None) -> None:
        if state == JobState.SUCCEEDED and best is not None:
            search.complete(number, best)
        elif state == JobState.PRUNED:
            search.pruned(number)
        else:  # failed, cancelled, or finished without any eval to judge it by
            search.failed(number)

    def _queue_trial(self, sweep: SweepRecord, spec: SweepSpec, search: SweepSearch) -> None:
        number, params = search.ask()
        loaded = LoadedSweep(spec=spec, path=Path(sweep.path), template=sweep.template)
        job = trial_spec(loaded, number, params)
        priority = int(job.get("priority", 0))
        job_id = self.queue.submit_trial(
            sweep.name, number, params, (job["name"], job, job["base_model"], priority)
        )
        log.info("[sweep %s] trial %d queued as %s: %s", sweep.name, number, job_id, params)

    def cancel(self, name: str) -> list[str]:
        """Stop a sweep: no more trials; its queued and running ones are cancelled."""
        self.queue.sweep(name)  # an unknown name raises
        self.queue.set_sweep_state(name, CANCELLED)
        cancelled = []
        for trial in self.queue.trials(name):
            if trial.job.state not in FINAL_STATES:
                self.queue.request_cancel(trial.job.id)
                cancelled.append(trial.job.id)
        return cancelled
