"""The `carpool` command line.

Each subcommand is a small `cmd_<name>(args) -> int` function registered with
`@subcommand` (`cli_registry`), together with a function that adds its
arguments; `main` builds the parser from the registry. Commands that are not
about the queue live in modules of their own (`cli_adapters`, ...). Heavy modules (torch, transformers) are imported
inside the commands so `carpool --help` stays fast.

User errors (bad specs, missing files; the typed errors `_user_error` lists)
are printed without a traceback and give exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carpool.orchestrator.cli.cli_registry import (
    SUBCOMMANDS,
    add_state_dir_argument,
    positive_int,
    subcommand,
)


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", type=Path, metavar="JOB.yaml", help="job spec files")


@subcommand("validate", "check job spec files and report every problem", _validate_arguments)
def cmd_validate(args: argparse.Namespace) -> int:
    from carpool.orchestrator.spec_check.validation import validate_files

    notes: list = []
    specs = validate_files(args.specs, notes)  # SpecValidationError is handled in main
    for path, spec in zip(args.specs, specs, strict=True):
        print(f"ok: {spec.name} ({path})")
    for note in notes:
        print(f"note: {note}")
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from carpool.workers.bank.adapter_math import ADAPTER_MATHS  # no torch: --help stays fast
    from carpool.workers.data.batch_layout import BATCH_LAYOUTS

    parser.add_argument("specs", nargs="+", type=Path, metavar="JOB.yaml", help="job spec files")
    parser.add_argument("--out", type=Path, required=True, help="adapters go to OUT/<name>/")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None,
        help="checkpoint each job here every save_steps; a rerun resumes from it",
    )  # fmt: skip
    parser.add_argument(
        "--micro-batch-tokens", type=positive_int, default=None,
        help="cap on tokens (padded ones too, when padded) per fused forward/backward "
        "(default: a whole round)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="recompute the base's layers in the backward: less memory, same adapters",
    )  # fmt: skip
    parser.add_argument(
        "--loss-chunk-tokens", type=positive_int, default=None, metavar="N",
        help="compute the loss N tokens at a time, never the whole batch's logits",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-math", choices=ADAPTER_MATHS, default="auto",
        help="LoRA terms per job (loop) or for all jobs at once (bmm, grouped_mm); "
        "auto: the fastest measured on the device",
    )  # fmt: skip
    parser.add_argument(
        "--batch-layout", choices=BATCH_LAYOUTS, default="auto",
        help="rows of a micro-batch padded to the longest, or packed end to end; "
        "auto: packed where the model allows it",
    )  # fmt: skip


@subcommand("train", "train jobs fused in this process and write PEFT adapters", _train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from carpool.orchestrator.cli.local_train import train_locally
    from carpool.orchestrator.cli.progress import JobProgress
    from carpool.orchestrator.spec_check.validation import validate_files
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars are the ones to watch

    specs = validate_files(args.specs)  # every problem of every file before any training
    with JobProgress() as progress:
        outputs = train_locally(
            specs,
            args.out,
            on_progress=progress.update,
            on_notice=progress.print,
            checkpoint_dir=args.checkpoint_dir,
            micro_batch_tokens=args.micro_batch_tokens,
            device=args.device,
            gradient_checkpointing=args.gradient_checkpointing,
            loss_chunk_tokens=args.loss_chunk_tokens,
            adapter_math=args.adapter_math,
            batch_layout=args.batch_layout,
        )
    for name, path in outputs.items():
        print(f"{name}: {path}")
    failed = [s.name for s in specs if s.name not in outputs]
    if failed:  # each one's reason was printed as it failed
        print(f"error: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# -- the queue and the controller ---------------------------------------------------------
def _client(args: argparse.Namespace):
    from carpool.orchestrator.runtime.client import Client

    return Client(args.state_dir)


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="attach to a running Ray cluster")
    parser.add_argument("--config", type=Path, default=None, help="operator config YAML")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray head")


@subcommand(
    "up", "start Ray (or attach to it) and the carpool controller", _up_arguments, uses_queue=True
)
def cmd_up(args: argparse.Namespace) -> int:
    from carpool.orchestrator.runtime.client import Client
    from carpool.orchestrator.runtime.ray_auth import token_mode_on, where_token_is
    from carpool.orchestrator.store.state_dir import shadowing_variable

    client = Client.up(
        args.config, address=args.address, num_cpus=args.num_cpus, state_dir=args.state_dir
    )
    if client.created_token is not None:
        print(f"created a Ray auth token in {client.created_token} (readable by you only)")
    print(f"carpool is up; state in {client.state_dir}")
    shadow = shadowing_variable(client.state_dir)
    if shadow is not None:
        print(
            f"note: $CARPOOL_STATE_DIR is {shadow}: other commands will look there, not in "
            f"{client.state_dir}, unless given --state-dir {client.state_dir}",
            file=sys.stderr,
        )
    sign_in = f" (sign in with Ray's auth token: {where_token_is()})" if token_mode_on() else ""
    print(f"Ray dashboard: {client.dashboard_url}{sign_in}")
    return 0


@subcommand(
    "down",
    "stop the controller and any Ray it started (queue and artifacts stay)",
    lambda p: None,
    uses_queue=True,
)
def cmd_down(args: argparse.Namespace) -> int:
    _client(args).down()
    print("carpool is down")
    return 0


@subcommand(
    "submit", "queue job specs; prints one job id per line", _validate_arguments, uses_queue=True
)
def cmd_submit(args: argparse.Namespace) -> int:
    notes: list = []
    job_ids = _client(args).submit(args.specs, notes)
    for note in notes:  # stderr: stdout stays one job id per line
        print(f"note: {note}", file=sys.stderr)
    for job_id in job_ids:
        print(job_id)
    return 0


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", nargs="?", default=None, help="one job id (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", action="store_true", help="live progress bars until all finish")
    parser.add_argument(
        "--history", action="store_true",
        help="the job's loss history: every logging_steps and every eval",
    )  # fmt: skip


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@subcommand(
    "status",
    "jobs' state, step/total, loss, tokens/s and group",
    _status_arguments,
    uses_queue=True,
)
def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.history:
        return _history(client, args)
    if args.watch:
        return _watch(client, args.job)
    records = client.status(args.job)
    from carpool.workers.spec.job_spec import adapter_variant  # late: the CLI starts fast

    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(
        f"{'JOB':<30} {'STATE':<10} {'KIND':<9} {'STEP':>11} {'LOSS':>8} {'EVAL':>8} {'TOK/S':>9} GROUP"
    )
    for r in records:
        step = f"{r['step']}/{_fmt(r['total_steps'])}"
        evaluated = _fmt(r["metrics"].get("eval_loss"), ".4f")
        print(
            f"{r['id']:<30} {r['state']:<10} {adapter_variant(r['spec'].get('adapter') or {}):<9} "
            f"{step:>11} {_fmt(r['loss'], '.4f'):>8} "
            f"{evaluated:>8} {_fmt(r['tokens_per_second'], ',.0f'):>9} {_fmt(r['group'])}"
        )
        for line in rank_lines(r["metrics"]):
            print(f"  {line}")
        if r["error"]:
            print(f"  error: {r['error']}")
    if (serving := _serving_line(client)) is not None:
        print(serving)
    return 0


def _serving_line(client) -> str | None:
    """Where `carpool serve`'s endpoint listens, when one runs."""
    import socket
    from urllib.parse import urlparse

    from carpool.orchestrator.runtime.actor_names import SERVING_RECORD

    path = client.state_dir / SERVING_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    url = urlparse(record["url"])
    try:
        socket.create_connection((url.hostname, url.port), timeout=2).close()
    except OSError:
        return f"serving: not answering at {record['url']} (`carpool serve` restarts it)"
    return f"serving: {record['url']} (key in {record['key_file']})"


def rank_lines(metrics: dict) -> list[str]:
    """What `status` adds under a DyLoRA or SoRA job: the rank of its last step."""
    lines = []
    if (rank := metrics.get("dylora_rank")) is not None:
        lines.append(f"dylora_rank {int(rank)}: the rank its last step trained")
    if (share := metrics.get("sora_kept_rank")) is not None:
        lines.append(f"sora_kept_rank {share:.3f}: the share of rank components kept")
    return lines


def _history(client, args: argparse.Namespace) -> int:
    if args.job is None:
        print("error: --history needs a JOB", file=sys.stderr)
        return 1
    entries = client.history(args.job)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print("\n".join(cli_history.history_table(entries)))
    return 0


def _watch(client, job_id: str | None) -> int:
    import time

    from carpool.orchestrator.cli.progress import JobProgress, JobProgressRow

    final = {"succeeded", "failed", "cancelled", "pruned"}
    with JobProgress() as progress:
        while True:
            records = client.status(job_id)
            for r in records:
                progress.update(
                    JobProgressRow(
                        r["id"],
                        r["step"],
                        r["total_steps"] or 1,
                        r["loss"],
                        r["tokens_per_second"],
                        r["state"],
                        eval_loss=r["metrics"].get("eval_loss"),
                        learning_rate=r["metrics"].get("learning_rate"),
                        grad_norm=r["metrics"].get("grad_norm"),
                    )  # fmt: skip
                )
            if all(r["state"] in final for r in records):
                return 0
            time.sleep(1.0)


def _wait_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="+", metavar="JOB")
    parser.add_argument("--timeout", type=float, default=None, help="seconds")


@subcommand(
    "wait",
    "wait for jobs: exit 0 all succeeded (or pruned), 1 any failed/cancelled, 2 timeout",
    _wait_arguments,
    uses_queue=True,
)
def cmd_wait(args: argparse.Namespace) -> int:
    try:
        states = _client(args).wait(args.jobs, timeout=args.timeout)
    except TimeoutError as e:
        print(f"timeout: {e}", file=sys.stderr)
        return 2
    for job_id, state in states.items():
        print(f"{job_id} {state}")
    # A sweep's pruned trial ended as its search chose: an end, not an error.
    return 0 if all(s in ("succeeded", "pruned") for s in states.values()) else 1


def _job_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB")


def _logs_arguments(parser: argparse.ArgumentParser) -> None:
    _job_argument(parser)
    parser.add_argument(
        "-f", "--follow", action="store_true", help="print new lines until the job is final"
    )


@subcommand("logs", "a job's log lines", _logs_arguments, uses_queue=True)
def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    lines = client.follow_logs(args.job) if args.follow else client.logs(args.job)
    for line in lines:
        print(line, flush=True)
    return 0


def _jobs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="+", metavar="JOB")


@subcommand(
    "cancel",
    "cancel jobs (a running one stops before its next step)",
    _jobs_argument,
    uses_queue=True,
)
def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    for job_id in args.jobs:  # an unknown id stops the command before any job is touched
        client.status(job_id)
    for job_id in args.jobs:
        record = client.cancel(job_id)
        print(f"{record['id']} {'cancelling' if record['cancel_requested'] else record['state']}")
    return 0


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PEFT adapter")


@subcommand(
    "fetch", "write a finished job's PEFT adapter directory", _fetch_arguments, uses_queue=True
)
def cmd_fetch(args: argparse.Namespace) -> int:
    print(_client(args).fetch(args.job, args.out))
    return 0


# Command modules register their subcommands when imported (here, so `carpool --help`
# lists them after the training and queue commands); none imports torch at its top.
from carpool.orchestrator.after_training import (  # noqa: E402
    cli_adapters,  # noqa: F401  (eval, generate)
    cli_merge,  # noqa: F401  (merge)
)
from carpool.orchestrator.cli import (  # noqa: E402
    cli_history,  # plot; status --history uses its table
    cli_sweep,  # noqa: F401  (sweep submit, status, plot, fetch, cancel)
)
from carpool.orchestrator.serving import serve_command  # noqa: E402, F401  (serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carpool", description="Train many LoRA jobs at once on one frozen base model."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        if command.uses_queue:
            add_state_dir_argument(sub)
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
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise  # a bug: keep the traceback
        print(_describe(user_error), file=sys.stderr)
        return 1


def run() -> None:
    """The `carpool` command: `main`, then an exit that skips tearing torch down."""
    from carpool.orchestrator.cli.process_exit import exit_process

    exit_process(main())


def _describe(error: Exception) -> str:
    """Spec problems one per line (each names file and field), a failed `ray start` with
    the last lines it printed; anything else one line."""
    from carpool.orchestrator.control.operator_config import OperatorConfigError
    from carpool.orchestrator.runtime.local_ray import RayStartError
    from carpool.orchestrator.spec_check.spec_problems import SpecValidationError

    if isinstance(error, (SpecValidationError, OperatorConfigError)):
        return str(error)
    if isinstance(error, RayStartError):
        return f"error: {error}"
    text = str(error).strip()
    return f"error: {text.splitlines()[0] if text else type(error).__name__}"


def _user_error(error: Exception) -> Exception | None:
    """The typed error the user can act on, unwrapped from Ray's task error; else None.

    Imported late, and none of these modules loads torch: an error costs no second of imports.
    """
    from carpool.orchestrator.after_training.adapter_args import AdapterArgumentError
    from carpool.orchestrator.cli.cli_sweep import NoBestTrialError
    from carpool.orchestrator.control.operator_config import OperatorConfigError
    from carpool.orchestrator.runtime.client import ControllerNotRunningError, JobNotFinishedError
    from carpool.orchestrator.runtime.local_ray import RayStartError
    from carpool.orchestrator.runtime.ray_auth import MissingRayTokenError
    from carpool.orchestrator.spec_check.spec_problems import SpecValidationError
    from carpool.orchestrator.store.job_ids import InvalidJobIdError
    from carpool.orchestrator.store.job_records import (
        InvalidTransitionError,
        SweepExistsError,
        UnknownJobError,
        UnknownSweepError,
    )
    from carpool.workers.data.dataset import DatasetError
    from carpool.workers.spec.job_spec import JobInputError

    user_errors = (
        SpecValidationError, DatasetError, JobInputError, ControllerNotRunningError,
        JobNotFinishedError, UnknownJobError, InvalidTransitionError, InvalidJobIdError,
        OperatorConfigError, FileNotFoundError, MissingRayTokenError, RayStartError,
        AdapterArgumentError, NoBestTrialError, SweepExistsError, UnknownSweepError,
    )  # fmt: skip
    # Errors raised inside the controller actor arrive wrapped, the original as `cause`.
    for candidate in (getattr(error, "cause", None), error):
        if isinstance(candidate, user_errors):
            return candidate
    return None


if __name__ == "__main__":
    run()
