"""`carpool serve`: deploy the OpenAI-compatible endpoint on the running carpool, or
stop it (`--stop`). Adapters named on the command line are checked (directories,
their bases, how the base loads) before anything is deployed."""

from __future__ import annotations

import argparse
import sys

from carpool.orchestrator.cli.cli_registry import subcommand


def _arguments(parser: argparse.ArgumentParser) -> None:
    from carpool.orchestrator.after_training.adapter_args import QUANTIZATION_CHOICES

    parser.add_argument(
        "adapters", nargs="*", metavar="ADAPTER",
        help="DIR or NAME=DIR: adapters to serve beside the queue's (needs --base)",
    )  # fmt: skip
    parser.add_argument("--base", default=None, help="the base the named adapters serve on")
    parser.add_argument(
        "--base-quantization", choices=QUANTIZATION_CHOICES, default="auto",
        help="load --base as the adapters were trained (auto), in its own precision, or 4-bit",
    )  # fmt: skip
    parser.add_argument("--stop", action="store_true", help="remove the endpoint")


@subcommand(
    "serve",
    "serve trained adapters over OpenAI's HTTP API on the cluster (--stop removes it)",
    _arguments,
    uses_queue=True,
)
def cmd_serve(args: argparse.Namespace) -> int:
    from carpool.orchestrator.after_training.adapter_args import (
        AdapterArgumentError,
        base_quantization,
        check_same_base,
        named_adapters,
    )
    from carpool.orchestrator.runtime.client import Client

    client = Client(args.state_dir)
    if args.stop:
        from carpool.orchestrator.serving.deployment import stop

        client.connect()
        print("serving stopped" if stop(client.state_dir) else "nothing was serving")
        return 0
    if args.adapters and args.base is None:
        raise AdapterArgumentError("adapters named on the command line need --base")
    adapters = named_adapters(args.adapters)
    quantization = None
    if args.base is not None:
        check_same_base(adapters, args.base)
        spec = base_quantization(adapters, args.base_quantization)
        quantization = None if spec is None else spec.model_dump(mode="json")
    config = client.config
    client.connect()
    from carpool.orchestrator.serving.deployment import deploy

    try:
        record = deploy(config, args.base, adapters, quantization)
    except ValueError as e:
        raise AdapterArgumentError(str(e)) from e
    print(f"serving at {record['url']} (bases: {', '.join(record['bases'])})")
    print(f"key: {record['key_file']} (send it as Authorization: Bearer <key>)")
    print("models: GET /v1/models; stop with `carpool serve --stop`", file=sys.stderr)
    return 0
