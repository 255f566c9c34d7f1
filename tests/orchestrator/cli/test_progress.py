"""Progress display: whole figures in a narrow terminal and in a log."""

from __future__ import annotations

import dataclasses
import io

from carpool.orchestrator.cli.progress import JobProgress, JobProgressRow
from rich.console import Console

LONG_ROW = JobProgressRow(
    "support-bot-large",
    123,
    4000,
    loss=0.123456,
    tokens_per_second=123456.7,
    eval_loss=1.234567,
    learning_rate=8.8e-5,
    grad_norm=0.5123,
)


def test_progress_at_80_columns_in_a_terminal_shows_whole_values() -> None:
    """A narrow terminal drops figures rather than cutting them ("0.…")."""
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    with JobProgress(console) as progress:
        progress.update(LONG_ROW)
    shown = console.file.getvalue()
    assert "…" not in shown
    assert "support-bot-large" in shown and "123/4000" in shown
    assert "loss 0.1235" in shown and "eval 1.2346" in shown


def test_progress_into_a_log_prints_every_figure_whole_every_tenth_and_on_change() -> None:
    console = Console(file=io.StringIO(), width=80)  # not a terminal
    with JobProgress(console) as progress:
        progress.update(LONG_ROW)
        progress.update(LONG_ROW)  # nothing new: no second line
        progress.update(dataclasses.replace(LONG_ROW, step=124))  # under a tenth further
        progress.update(dataclasses.replace(LONG_ROW, step=523))  # a tenth (400 steps) on
        progress.update(dataclasses.replace(LONG_ROW, step=524, eval_loss=1.0))  # new eval
        progress.update(dataclasses.replace(LONG_ROW, step=4000, state="done"))
    lines = console.file.getvalue().splitlines()
    assert "…" not in lines[0]
    for figure in ("step 123/4000", "loss 0.1235", "eval 1.2346", "lr 8.80e-05", "gnorm 0.512"):
        assert figure in lines[0]
    assert "123,457 tok/s" in lines[0]
    assert [line.split()[2] for line in lines] == ["123/4000", "523/4000", "524/4000", "4000/4000"]
    assert lines[-1].endswith("done")
