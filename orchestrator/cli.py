"""The `carpool` command line.

Each subcommand is a small `cmd_<name>(args) -> int` function registered with
`@subcommand`, together with a function that adds its arguments; `main` builds
the parser from the registry. Heavy modules (torch, transformers) are imported
inside the commands so `carpool --help` stays fast.

User errors (bad specs, missing files) are printed without a traceback and
give exit status 1; raise `CliError` from a command for such an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CommandFn = Callable[[argparse.Namespace], int]
ArgumentsFn = Callable[[argparse.ArgumentParser], None]


class CliError(Exception):
    """An error the user can fix; printed as one line, no traceback, exit status 1."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: ArgumentsFn
    run: CommandFn


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, add_arguments: ArgumentsFn
) -> Callable[[CommandFn], CommandFn]:
    """Register `cmd_<name>` as `carpool <name>`."""

    def register(fn: CommandFn) -> CommandFn:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, fn)
        return fn

    return register


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", type=Path, metavar="JOB.yaml", help="job spec files")


@subcommand("validate", "check job spec files and report every problem", _validate_arguments)
def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.validation import validate_files

    specs = validate_files(args.specs)  # SpecValidationError is handled in main
    for path, spec in zip(args.specs, specs, strict=True):
        print(f"ok: {spec.name} ({path})")
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", type=Path, metavar="JOB.yaml", help="job spec files")
    parser.add_argument("--out", type=Path, required=True, help="adapters go to OUT/<name>/")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None,
        help="checkpoint each job here every save_steps; a rerun resumes from it",
    )  # fmt: skip
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None,
        help="cap on padded tokens per fused forward/backward (default: a whole round)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)"
    )


@subcommand("train", "train jobs fused in this process and write PEFT adapters", _train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from orchestrator.local_train import train_locally
    from orchestrator.progress import JobProgress
    from orchestrator.validation import validate_files

    hf_logging.disable_progress_bar()  # our own bars are the ones to watch

    specs = validate_files(args.specs)  # every problem of every file before any training
    with JobProgress() as progress:
        outputs = train_locally(
            specs,
            args.out,
            on_progress=progress.update,
            on_notice=progress.progress.console.print,
            checkpoint_dir=args.checkpoint_dir,
            micro_batch_tokens=args.micro_batch_tokens,
            device=args.device,
        )
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carpool", description="Train many LoRA jobs at once on one frozen base model."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise  # a bug: keep the traceback
        print(str(e), file=sys.stderr)
        return 1


def _is_user_error(error: Exception) -> bool:
    """Typed errors that already name their file and field; imported late (they pull in torch)."""
    from orchestrator.validation import SpecValidationError
    from workers.dataset import DatasetError

    return isinstance(error, (SpecValidationError, DatasetError))


if __name__ == "__main__":
    sys.exit(main())
