"""Per-job progress (step, loss, eval loss, learning rate, grad norm, tokens/s), shown whole.

In a terminal wide enough for every figure, one live bar per job with all of them; in a
narrower terminal, the bar with the figures that fit (step, loss, eval, state), never a
number cut short; when output is not a terminal (a log, a pipe, `make demo` captured),
a plain line per job, every figure in full, when its state or eval loss changes and every
tenth of its steps (a log of a long job stays short).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# The full row (name, bar, M/N, five figures, state, time) needs about this many columns.
WIDE_TERMINAL = 132


@dataclass
class JobProgressRow:
    name: str
    step: int
    total_steps: int
    loss: float | None = None
    tokens_per_second: float | None = None
    state: str = "running"
    eval_loss: float | None = None  # the latest, when the job has eval rows
    learning_rate: float | None = None
    grad_norm: float | None = None  # before clipping


def figures(row: JobProgressRow) -> dict[str, str]:
    """Each figure as text, whole ("-" where there is none yet)."""
    return {
        "name": row.name,
        "loss": "-" if row.loss is None else f"{row.loss:.4f}",
        "eval": "-" if row.eval_loss is None else f"{row.eval_loss:.4f}",
        "lr": "-" if row.learning_rate is None else f"{row.learning_rate:.2e}",
        "gnorm": "-" if row.grad_norm is None else f"{row.grad_norm:.3g}",
        "tps": "-" if row.tokens_per_second is None else f"{row.tokens_per_second:,.0f}",
        "state": row.state,
    }


def progress_line(row: JobProgressRow) -> str:
    """One job's figures on one plain line, for logs."""
    f = figures(row)
    return (
        f"{f['name']}  step {row.step}/{row.total_steps}  loss {f['loss']}  eval {f['eval']}"
        f"  lr {f['lr']}  gnorm {f['gnorm']}  {f['tps']} tok/s  {f['state']}"
    )


def _columns(width: int) -> list:
    """The bar's columns for a terminal `width` wide: all of them, or those that fit 80."""
    if width >= WIDE_TERMINAL:
        return [
            TextColumn("[bold]{task.fields[name]:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:>7}"),
            TextColumn("eval {task.fields[eval]:>7}"),
            TextColumn("lr {task.fields[lr]:>8}"),
            TextColumn("gnorm {task.fields[gnorm]:>7}"),
            TextColumn("{task.fields[tps]:>9} tok/s"),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
        ]
    return [
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eval {task.fields[eval]}"),
        TextColumn("{task.fields[state]}"),
    ]


class JobProgress:
    """Every job's latest figures; call `update` with each job's row."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.progress = (
            Progress(*_columns(self.console.width), console=self.console, transient=False)
            if self.live
            else None
        )
        self._tasks: dict[str, int] = {}
        self._shown: dict[str, tuple] = {}  # lines mode: each job's last line's (state, eval)
        self._shown_step: dict[str, int] = {}  # ...and its step

    def __enter__(self) -> JobProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, text: str) -> None:
        """A notice above the bars (or between the lines)."""
        self.console.print(text, soft_wrap=True)

    def update(self, row: JobProgressRow) -> None:
        if self.progress is None:
            self._print_line(row)
            return
        fields = figures(row)
        if row.name not in self._tasks:
            self._tasks[row.name] = self.progress.add_task(
                row.name, total=row.total_steps, completed=row.step, **fields
            )
        else:
            self.progress.update(
                self._tasks[row.name], completed=row.step, total=row.total_steps, **fields
            )

    def _print_line(self, row: JobProgressRow) -> None:
        key = (row.state, row.eval_loss)
        last_step = self._shown_step.get(row.name)
        every = max(1, row.total_steps // 10)
        stepped = last_step is None or row.step >= last_step + every or row.step == row.total_steps
        if self._shown.get(row.name) != key or (stepped and row.step != last_step):
            self._shown[row.name], self._shown_step[row.name] = key, row.step
            self.console.print(progress_line(row), soft_wrap=True, highlight=False)
