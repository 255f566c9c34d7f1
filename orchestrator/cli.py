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
