"""`carpool merge`: finished adapters merged into one with PEFT, or folded into the base."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from carpool.orchestrator.after_training.adapter_args import (
    AdapterArgumentError,
    check_same_base,
    named_adapters,
)
from carpool.orchestrator.cli.cli_registry import subcommand


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    from carpool.workers.after_training.merge_methods import (
        METHODS,  # torch-free: --help stays fast
    )

    parser.add_argument(
        "adapters", nargs="+", metavar="ADAPTER",
        help="PEFT LoRA adapter directories, as DIR or NAME=DIR",
    )  # fmt: skip
    parser.add_argument("--base", required=True, help="the base model (directory or hub id)")
    parser.add_argument(
        "--weights", nargs="+", type=float, default=None, metavar="W",
        help="one weight per adapter, in order; negative subtracts (default: 1.0 each)",
    )  # fmt: skip
    parser.add_argument(
        "--method", choices=METHODS, default="cat",
        help="PEFT's combination_type (default: cat, exact for any ranks; linear, ties, "
        "dare_* and magnitude_prune need one rank)",
    )  # fmt: skip
    parser.add_argument(
        "--density", type=float, default=None, metavar="D",
        help="fraction of weights kept, in (0, 1]: for ties*, dare_* and magnitude_prune* only",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds DARE's random drops (default: 0)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the merged adapter (PEFT format) here"
    )
    parser.add_argument(
        "--into-base", type=Path, default=None, metavar="OUT_MODEL",
        help="write the base with the (merged) adapter folded in, and its tokenizer, here; "
        "give --out, --into-base or both",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where to merge (default: cpu)")


def _output_problem(flag: str, path: Path | None) -> str | None:
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        return f"{flag}: {path} exists and is not empty; carpool does not overwrite it"
    return None


def _check_arguments(args: argparse.Namespace, count: int) -> list[float]:
    """The weights, once every argument checkable without reading an adapter is."""
    from carpool.workers.after_training.merge_methods import merge_argument_problem
    from carpool.workers.base.base_fingerprint import local_model_dir

    if args.out is None and args.into_base is None:
        raise AdapterArgumentError("--out / --into-base: give one or both")
    both = args.out is not None and args.into_base is not None
    if both and args.out.resolve() == args.into_base.resolve():
        raise AdapterArgumentError("--into-base: the same directory as --out")
    weights = args.weights if args.weights is not None else [1.0] * count
    for why in (
        merge_argument_problem(args.method, count, weights, args.density),
        _output_problem("--out", args.out),
        _output_problem("--into-base", args.into_base),
    ):
        if why:
            raise AdapterArgumentError(why)
    if local_model_dir(args.base) is None:
        raise AdapterArgumentError(f"--base {args.base!r}: no such local model or cached hub id")
    return weights


@subcommand("merge", "merge adapters into one (PEFT), or fold them into the base", _merge_arguments)
def cmd_merge(args: argparse.Namespace) -> int:
    adapters = named_adapters(args.adapters)
    weights = _check_arguments(args, len(adapters))
    check_same_base(adapters, args.base)

    import torch
    from carpool.workers.after_training import adapter_merge
    from carpool.workers.base.base_model import load_base
    from carpool.workers.peft_files.atomic_dir import atomic_dir

    try:
        headers = adapter_merge.check_mergeable(adapters, args.method)
        base = load_base(args.base, device=torch.device(args.device))
        adapter_merge.check_fits_base(base, headers)
    except adapter_merge.MergeRefusedError as e:
        raise AdapterArgumentError(str(e)) from e
    model = adapter_merge.merge_adapters(
        base, adapters, weights, args.method, density=args.density, seed=args.seed
    )
    merged_from = {
        "method": args.method,
        "density": args.density,
        "seed": args.seed,
        "adapters": [
            {"name": name, "dir": str(path.resolve()), "weight": weight}
            for (name, path), weight in zip(adapters.items(), weights, strict=True)
        ],
    }
    # Both outputs appear together when all went well, neither when something failed.
    with ExitStack() as outputs:
        if args.out is not None:
            out = outputs.enter_context(atomic_dir(args.out))
            adapter_merge.save_merged_adapter(
                model, out, base_model=args.base, merged_from=merged_from
            )
        if args.into_base is not None:
            folded = outputs.enter_context(atomic_dir(args.into_base))
            adapter_merge.save_folded_model(model, folded, base_model=args.base)
    described = f"{len(adapters)} adapters ({args.method})" if len(adapters) > 1 else "1 adapter"
    if args.out is not None:
        print(f"merged {described} into {args.out}")
    if args.into_base is not None:
        print(f"folded {described} into the base: {args.into_base}")
    return 0
