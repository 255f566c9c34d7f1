"""`carpool eval --objective ...` on a file of preference pairs: each adapter's objective
loss and TRL's reward figures, all adapters fused, against the base (or `--reference`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from carpool.orchestrator.after_training.adapter_args import AdapterArgumentError
from pydantic import TypeAdapter, ValidationError


def parse_objective(text: str) -> Any:
    """`--objective` as the spec's `objective` mapping, e.g. "{type: dpo, beta: 0.1}"."""
    from carpool.workers.spec.objective import Objective

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {e}") from e
    try:
        return TypeAdapter(Objective).validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "type"
        raise argparse.ArgumentTypeError(f"{where}: {first['msg']}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--objective", type=parse_objective, default=None, metavar="MAPPING",
        help="score a file of preference pairs by this objective, as a spec writes it, "
        'e.g. "{type: dpo, beta: 0.1}"',
    )  # fmt: skip
    parser.add_argument(
        "--reference", type=Path, default=None, metavar="DIR",
        help="with a dpo --objective: the reference policy is this adapter (default: the base)",
    )  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """Refusals of the pair-eval arguments, before anything loads."""
    from carpool.workers.spec.objective import is_paired, needs_reference

    if args.reference is not None and args.objective is None:
        raise AdapterArgumentError("--reference needs --objective (it is a preference option)")
    if args.objective is not None and not is_paired(args.objective):
        raise AdapterArgumentError(
            f"--objective: type {args.objective.type} scores no pairs; use dpo, simpo, cpo or "
            "orpo (or leave it out)"
        )
    if args.reference is not None and not needs_reference(args.objective):
        raise AdapterArgumentError(
            f"--reference: objective {args.objective.type} has no reference policy (dpo has)"
        )
    if args.reference is not None:
        from carpool.orchestrator.after_training.adapter_args import named_adapters

        named_adapters([str(args.reference)])  # a PEFT adapter directory, or a clear refusal


def run(args: argparse.Namespace, fused, dataset) -> int:
    """Print every adapter's objective loss and reward figures, best first."""
    from carpool.workers.after_training.pair_eval import evaluate_pairs
    from carpool.workers.spec.objective import format_problem

    if problem := format_problem(args.objective, dataset.format):
        raise AdapterArgumentError(f"--dataset {args.dataset}: {problem}")
    results = evaluate_pairs(fused, dataset, args.objective, args.reference)
    if args.json:  # one document, as every --json prints
        records = [
            {"adapter": r.name, "eval_loss": r.loss, **r.figures, "pairs": r.pairs} for r in results
        ]
        print(json.dumps(records, indent=2))
        return 0
    width = max(len("ADAPTER"), *(len(r.name) for r in results))
    print(f"{'ADAPTER':<{width}}  {'LOSS':>8}  {'ACCURACY':>8}  {'MARGIN':>8}  {'PAIRS':>6}")
    for r in results:
        accuracy, margin = r.figures["eval_rewards/accuracies"], r.figures["eval_rewards/margins"]
        print(f"{r.name:<{width}}  {r.loss:>8.4f}  {accuracy:>8.3f}  {margin:>8.4f}  {r.pairs:>6}")
    return 0
