"""Live per-job progress bars in the terminal (step, loss, learning rate, grad norm, tokens/s)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


class JobProgress:
    """One bar per job; call `update` with each job's latest figures."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
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
            console=console,
            transient=False,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, row: JobProgressRow) -> None:
        fields = {
            "name": row.name,
            "loss": "-" if row.loss is None else f"{row.loss:.4f}",
            "eval": "-" if row.eval_loss is None else f"{row.eval_loss:.4f}",
            "lr": "-" if row.learning_rate is None else f"{row.learning_rate:.2e}",
            "gnorm": "-" if row.grad_norm is None else f"{row.grad_norm:.3g}",
            "tps": "-" if row.tokens_per_second is None else f"{row.tokens_per_second:,.0f}",
            "state": row.state,
        }
        if row.name not in self._tasks:
            self._tasks[row.name] = self.progress.add_task(
                row.name, total=row.total_steps, completed=row.step, **fields
            )
        else:
            self.progress.update(
                self._tasks[row.name], completed=row.step, total=row.total_steps, **fields
            )
