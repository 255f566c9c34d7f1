"""`carpool plot`, and the history table of `carpool status JOB --history`.

A job's history comes from the queue (a job id, through the controller) or
from an adapter directory's `trainer_state.json` (`carpool train`'s output, a
fetched adapter, or a directory HF's Trainer wrote). No torch here: a failing
command stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from carpool.orchestrator.cli.cli_registry import subcommand
from carpool.workers.training.training_history import TRAINER_STATE_FILE, read_log_history

History = list[dict[str, Any]]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def history_table(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per entry: train entries carry loss, LR, grad norm and tokens; evals eval_loss."""
    lines = [
        f"{'STEP':>7} {'EPOCH':>7} {'LOSS':>9} {'EVAL_LOSS':>9} {'LR':>10} {'GRAD_NORM':>9} "
        f"{'TOKENS':>11}"
    ]
    for e in entries:
        lines.append(
            f"{e['step']:>7} {_fmt(e.get('epoch'), '.2f'):>7} {_fmt(e.get('loss'), '.4f'):>9} "
            f"{_fmt(e.get('eval_loss'), '.4f'):>9} {_fmt(e.get('learning_rate'), '.3g'):>10} "
            f"{_fmt(e.get('grad_norm'), '.4f'):>9} "
            f"{_fmt(e.get('num_input_tokens_seen'), ','):>11}"
        )
    return lines


def load_history(target: str, job_history: Callable[[str], History]) -> History:
    """The history of `target`: a directory (or its trainer_state.json), else a job id."""
    path = Path(target)
    if path.is_file() and path.name == TRAINER_STATE_FILE:
        path = path.parent
    if path.is_dir():
        return read_log_history(path)  # TrainerStateNotFoundError names the directory
    if path.exists() or "/" in target or "\\" in target:
        raise FileNotFoundError(f"{target}: not a directory with {TRAINER_STATE_FILE}")
    return job_history(target)


def _label(target: str) -> str:
    """A directory's name (an adapter's is its job's), else the job id as given."""
    path = Path(target)
    if not path.exists():
        return target
    return (path.parent if path.is_file() else path).resolve().name


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets", nargs="+", metavar="JOB_OR_DIR",
        help="queue job ids, or adapter directories holding trainer_state.json",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("curves.png"), help="image to write (default: curves.png)"
    )


@subcommand(
    "plot",
    "draw jobs' train and eval loss curves on one figure",
    _plot_arguments,
    uses_queue=True,  # job ids are read from the carpool of --state-dir
)
def cmd_plot(args: argparse.Namespace) -> int:
    from carpool.orchestrator.cli.loss_plot import plot_losses

    client = None

    def job_history(job_id: str) -> History:
        nonlocal client
        if client is None:  # only job ids need a controller
            from carpool.orchestrator.runtime.client import Client

            client = Client(args.state_dir)
        return client.history(job_id)

    histories = {}
    for target in args.targets:  # every target read before anything is drawn
        label = _label(target)
        if label in histories:  # two adapters named alike: their paths tell them apart
            label = target
        histories[label] = load_history(target, job_history)
        if not histories[label]:
            print(f"note: {target} has no history yet", file=sys.stderr)
    print(plot_losses(histories, args.out))
    return 0
