"""The registry of `carpool` subcommands, shared by the modules that define them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CommandFn = Callable[[argparse.Namespace], int]
ArgumentsFn = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: ArgumentsFn
    run: CommandFn
    uses_queue: bool  # talks to a carpool's state directory: takes --state-dir


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, add_arguments: ArgumentsFn, *, uses_queue: bool = False
) -> Callable[[CommandFn], CommandFn]:
    """Register `cmd_<name>` as `carpool <name>`."""

    def register(fn: CommandFn) -> CommandFn:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, fn, uses_queue)
        return fn

    return register


def positive_int(text: str) -> int:
    """An argparse type: refused with the option's name before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--state-dir`, on every command that talks to a carpool's queue."""
    parser.add_argument(
        "--state-dir", type=Path, default=None, metavar="DIR",
        help="the carpool's state directory (default: $CARPOOL_STATE_DIR, else the "
        "last `carpool up`'s, else ~/.carpool)",
    )  # fmt: skip
