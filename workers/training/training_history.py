"""A job's loss history, in the layout of HF Trainer's `log_history`.

Entries are kept every `logging_steps` steps and at the job's last step
(`loss` is the mean of the step losses since the previous entry, as the
Trainer logs it) and at every evaluation (`eval_loss`). The history is part of
the job's checkpointed state, so a resumed job's history is the one it would
have had uninterrupted; it is exported beside the adapter as
`trainer_state.json`, which `transformers.TrainerState.load_from_json` reads.

Standard library only: the CLI reads and plots histories without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_STATE_FILE = "trainer_state.json"


class TrainerStateNotFoundError(FileNotFoundError):
    """A directory that holds no `trainer_state.json`."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self.directory = str(directory)

    def __str__(self) -> str:
        return f"{self.directory}: no {TRAINER_STATE_FILE} (not an exported adapter?)"


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What the history takes from one optimizer step."""

    step: int  # steps done after this one
    loss: float
    learning_rate: float
    grad_norm: float
    epoch: float  # fractional epochs done, as the Trainer counts them
    tokens_seen: int  # real tokens of all the job's steps so far
    # The objective's own figures (TRL's names): logged as their mean since the last entry.
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Values of this step alone (DyLoRA's drawn rank): logged as the entry's step has them.
    values: Mapping[str, float] = field(default_factory=dict)


class TrainingHistory:
    """The log entries of one job, and the losses not yet logged."""

    def __init__(self, logging_steps: int, total_steps: int) -> None:
        self.logging_steps = logging_steps
        self.total_steps = total_steps
        self.entries: list[dict[str, Any]] = []
        self._loss_sum = 0.0  # of the steps since the last train entry
        self._loss_steps = 0
        self._metric_sums: dict[str, float] = {}  # likewise, per objective metric

    def record_step(self, record: StepRecord) -> None:
        self._loss_sum += record.loss
        self._loss_steps += 1
        for name, value in record.metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
        if record.step % self.logging_steps and record.step < self.total_steps:
            return
        self.entries.append(
            {
                "loss": self._loss_sum / self._loss_steps,
                "grad_norm": record.grad_norm,  # of the last step, as the Trainer logs it
                "learning_rate": record.learning_rate,
                **{k: v / self._loss_steps for k, v in sorted(self._metric_sums.items())},
                **dict(sorted(record.values.items())),
                "epoch": record.epoch,
                "num_input_tokens_seen": record.tokens_seen,
                "step": record.step,
            }
        )
        self._loss_sum, self._loss_steps, self._metric_sums = 0.0, 0, {}

    def record_eval(
        self, step: int, epoch: float, eval_loss: float, metrics: Mapping[str, float] = ()
    ) -> None:
        """An evaluation's entry; `metrics` are the objective's (`eval_rewards/margins`, ...)."""
        entry = {"eval_loss": eval_loss, **dict(sorted(dict(metrics).items()))}
        self.entries.append({**entry, "epoch": epoch, "step": step})

    def state_dict(self) -> dict[str, Any]:
        # Plain containers: checkpoints are read with torch.load(weights_only=True).
        return {
            "entries": [dict(e) for e in self.entries],
            "loss_sum": self._loss_sum,
            "loss_steps": self._loss_steps,
            "metric_sums": dict(self._metric_sums),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [dict(e) for e in state["entries"]]
        self._loss_sum = float(state["loss_sum"])
        self._loss_steps = int(state["loss_steps"])
        self._metric_sums = {k: float(v) for k, v in state.get("metric_sums", {}).items()}


def trainer_state(
    entries: Sequence[dict[str, Any]],
    *,
    global_step: int,
    max_steps: int,
    epoch: float,
    logging_steps: int,
    eval_steps: int | None,
    save_steps: int,
    train_batch_size: int,
    num_input_tokens_seen: int,
) -> dict[str, Any]:
    """The fields of HF's `TrainerState` (as `save_to_json` writes them) for one job."""
    return {
        "epoch": epoch,
        "global_step": global_step,
        "max_steps": max_steps,
        "logging_steps": logging_steps,
        # The Trainer's field is an int; None (evaluated only at the end) becomes max_steps.
        "eval_steps": eval_steps if eval_steps is not None else max_steps,
        "save_steps": save_steps,
        "train_batch_size": train_batch_size,
        "num_train_epochs": math.ceil(epoch),
        "num_input_tokens_seen": num_input_tokens_seen,
        "total_flos": 0.0,
        "log_history": [dict(e) for e in entries],
        "best_metric": None,
        "best_global_step": None,
        "best_model_checkpoint": None,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "is_hyper_param_search": False,
        "trial_name": None,
        "trial_params": None,
        "stateful_callbacks": {},
    }


def write_trainer_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / TRAINER_STATE_FILE
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")  # as the Trainer does
    return path


def read_log_history(directory: str | Path) -> list[dict[str, Any]]:
    """The `log_history` of `directory/trainer_state.json` (ours or the Trainer's)."""
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.is_file():
        raise TrainerStateNotFoundError(directory)
    return list(json.loads(path.read_text()).get("log_history", []))
