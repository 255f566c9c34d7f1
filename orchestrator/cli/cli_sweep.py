"""`carpool sweep submit|status|plot|fetch|cancel`: a hyperparameter search whose trials
are ordinary jobs on the queue. No torch at import: a refused command stays fast."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from carpool.orchestrator.cli.cli_registry import add_state_dir_argument, subcommand


class NoBestTrialError(LookupError):
    def __str__(self) -> str:
        return str(self.args[0])


def _arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="sweep_command", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help)
        add_state_dir_argument(sub)
        return sub

    action("submit", "check a sweep file and its whole space, then queue its trials").add_argument(
        "sweep_file", type=Path, metavar="SWEEP.yaml"
    )
    status = action("status", "trials sorted by metric, the best one marked")
    status.add_argument("name", metavar="NAME")
    status.add_argument("--json", action="store_true", help="the sweep and its trials as JSON")
    plot = action("plot", "every trial's eval curve on one figure, pruned ones dashed")
    plot.add_argument("name", metavar="NAME")
    plot.add_argument("--out", type=Path, default=Path("sweep.png"), help="default: sweep.png")
    fetch = action("fetch", "write the best trial's PEFT adapter directory")
    fetch.add_argument("name", metavar="NAME")
    fetch.add_argument("--out", type=Path, required=True, help="directory for the adapter")
    action("cancel", "no more trials; cancel the queued and running ones").add_argument(
        "name", metavar="NAME"
    )


@subcommand("sweep", "hyperparameter sweeps: trials ride together, losers stop early", _arguments)
def cmd_sweep(args: argparse.Namespace) -> int:
    from carpool.orchestrator.runtime.client import Client

    client = Client(args.state_dir)
    if args.sweep_command == "submit":
        name = client.submit_sweep(args.sweep_file)
        print(f"sweep {name} submitted; follow it with `carpool sweep status {name}`")
        return 0
    if args.sweep_command == "cancel":
        cancelled = client.cancel_sweep(args.name)
        print(f"sweep {args.name} cancelled ({len(cancelled)} trial(s) stopping)")
        return 0
    status = client.sweep_status(args.name)
    trials = ranked(status["trials"])
    best = best_trial(status["trials"])
    if args.sweep_command == "status":
        if args.json:
            shown = [with_state_and_step(t) for t in trials]
            chosen = None if best is None else with_state_and_step(best)
            print(json.dumps({**status, "trials": shown, "best": chosen}, indent=2))
        else:
            print("\n".join(status_table(status["sweep"], trials, best)))
        return 0
    if args.sweep_command == "fetch":
        if best is None:
            raise NoBestTrialError(
                f"sweep {args.name} has no trial that succeeded with an eval loss"
            )
        path = client.fetch(best["job"]["id"], args.out)
        print(f"trial {best['number']} ({best['job']['id']}, eval_loss {best['best']:.4f}): {path}")
        return 0
    return _plot(client, args.name, trials, best, args.out)


def ranked(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials by their best metric (lowest first), those without one last, by number."""
    return sorted(trials, key=lambda t: (t["best"] is None, t["best"] or 0.0, t["number"]))


def with_state_and_step(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial with its job's `state` and `step` at its top level, beside `best`, as the
    table shows them (the whole job record stays under `job`)."""
    return {**trial, "state": trial["job"]["state"], "step": trial["job"]["step"]}


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The succeeded trial with the lowest metric (a pruned one never ran to the end)."""
    done = [t for t in trials if t["job"]["state"] == "succeeded" and t["best"] is not None]
    return min(done, key=lambda t: (t["best"], t["number"]), default=None)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def status_table(sweep: dict, trials: list[dict], best: dict | None) -> list[str]:
    spec = sweep["spec"]
    lines = [
        f"sweep {sweep['name']}: {sweep['state']}, {len(trials)}/{spec['trials']} trials asked, "
        f"sampler {spec['sampler']}, pruner {spec['pruner']}"
    ]
    names = list(spec["parameters"])
    header = ["", "TRIAL", "STATE", "STEP", "BEST_EVAL", *names, "JOB"]
    rows = []
    for t in trials:
        job = t["job"]
        mark = "*" if best is not None and t["number"] == best["number"] else ""
        metric = "-" if t["best"] is None else f"{t['best']:.4f}"
        step = f"{job['step']}/{job['total_steps'] or '?'}"
        values = [_show(t["params"].get(n)) for n in names]
        rows.append([mark, str(t["number"]), job["state"], step, metric, *values, job["id"]])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _plot(client, name: str, trials: list[dict], best: dict | None, out: Path) -> int:
    from carpool.orchestrator.cli.loss_plot import plot_eval_curves

    curves = []
    for t in trials:
        label = f"t{t['number']:02d} {t['job']['state']}" + (
            " (best)" if best is not None and t["number"] == best["number"] else ""
        )
        pruned = t["job"]["state"] == "pruned"
        curves.append((label, client.history(t["job"]["id"]), pruned))
    path = plot_eval_curves(curves, out, title=f"sweep {name}: eval loss per trial")
    print(path)
    return 0
