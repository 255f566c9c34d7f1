"""Loss curves of several jobs on one figure, written to an image file.

A `matplotlib.figure.Figure` made directly, never through pyplot: no GUI
backend is chosen or needed (headless machines, Ray workers), and a caller's
own pyplot state is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MARGIN = "rewards/margins"  # TRL's name, as a preference job's history keeps it


def plot_losses(histories: Mapping[str, Sequence[dict[str, Any]]], out: str | Path) -> Path:
    """Train loss (solid) and eval loss (dashed) per job against the step; one colour a job.
    When a job is a preference job, a second panel draws its reward margin
    (`rewards/margins`, the chosen minus the rejected reward) against the step."""
    from matplotlib.figure import Figure  # late: ~0.3 s to import, only plotting needs it

    margins = {
        label: [(e["step"], e[MARGIN]) for e in entries if MARGIN in e]
        for label, entries in histories.items()
    }
    preference = any(margins.values())
    fig = Figure(figsize=(8, 8 if preference else 5), layout="constrained")
    ax = fig.add_subplot(2, 1, 1) if preference else fig.add_subplot()
    for i, (label, entries) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
        if train:
            ax.plot(*zip(*train, strict=True), color=colour, label=f"{label} train")
        if evals:
            ax.plot(
                *zip(*evals, strict=True),
                color=colour,
                linestyle="--",
                marker="o" if len(evals) < 20 else None,  # a lone end-of-run eval stays visible
                label=f"{label} eval",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    if preference:
        reward = fig.add_subplot(2, 1, 2, sharex=ax)
        for i, (label, points) in enumerate(margins.items()):
            if points:
                reward.plot(*zip(*points, strict=True), color=f"C{i % 10}", label=label)
        reward.axhline(0.0, color="grey", linewidth=0.8)
        reward.set_xlabel("step")
        reward.set_ylabel("reward margin (chosen - rejected)")
        reward.grid(alpha=0.3)
        reward.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_eval_curves(
    curves: Sequence[tuple[str, Sequence[dict[str, Any]], bool]], out: str | Path, title: str
) -> Path:
    """Each (label, history, dashed) as its eval loss against the step: a sweep's trials,
    pruned ones dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, entries, dashed) in enumerate(curves):
        evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
        if evals:
            ax.plot(
                *zip(*evals, strict=True),
                color=f"C{i % 10}",
                linestyle="--" if dashed else "-",
                marker="o",
                markersize=3,
                label=label,
            )
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="x-small", ncol=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
