"""`carpool eval` and `carpool generate`: finished adapters, many at once on one base.

Adapters are named `DIR` or `NAME=DIR` (the name defaults to the directory's
name). Arguments, adapter directories, the bases they were trained on and the
data are all checked before the base is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from carpool.orchestrator.cli.cli_registry import positive_int, subcommand

if TYPE_CHECKING:
    from carpool.workers.spec.job_spec import QuantizationSpec


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    from carpool.orchestrator.after_training.adapter_args import QUANTIZATION_CHOICES
    from carpool.workers.bank.adapter_math import ADAPTER_MATHS  # no torch

    parser.add_argument("--base", required=True, help="the base model (a path or a hub id)")
    parser.add_argument(
        "--include-base", action="store_true",
        help="also run the bare base, named `base`, beside the adapters",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    parser.add_argument(
        "--adapter-math", choices=ADAPTER_MATHS, default="auto",
        help="LoRA terms per adapter (loop) or for all at once (bmm, grouped_mm)",
    )  # fmt: skip
    parser.add_argument(
        "--base-quantization", choices=QUANTIZATION_CHOICES, default="auto",
        help="load the base as the adapters were trained (auto: 4-bit for QLoRA adapters), "
        "in its own precision (none), or in 4 bits (nf4, fp4)",
    )  # fmt: skip


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from carpool.orchestrator.after_training import pair_eval_command
    from carpool.workers.data.dataset import FORMATS

    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="DIR or NAME=DIR")
    _common_arguments(parser)
    parser.add_argument("--dataset", required=True, type=Path, help="a .jsonl or .parquet file")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto")
    parser.add_argument(
        "--max-seq-length", type=positive_int, default=512, metavar="N",
        help="rows are cut to N tokens, as training cuts them (default 512)",
    )  # fmt: skip
    parser.add_argument(
        "--micro-batch-tokens", type=positive_int, default=4096, metavar="N",
        help="padded tokens per forward pass (default 4096)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", help="one JSON document: a list, an entry per adapter"
    )
    pair_eval_command.add_arguments(parser)


def _checked_adapters(args: argparse.Namespace) -> tuple[dict[str, Path], QuantizationSpec | None]:
    """The named adapters, and how to load the base for them (None: its own precision)."""
    from carpool.orchestrator.after_training.adapter_args import (
        AdapterArgumentError,
        base_quantization,
        check_same_base,
        named_adapters,
    )
    from carpool.workers.after_training.fused_inference import BASE

    adapters = named_adapters(args.adapters)
    if args.include_base and BASE in adapters:
        raise AdapterArgumentError(
            f"adapter name {BASE!r} is taken by --include-base; name it apart with NAME=DIR"
        )
    check_same_base(adapters, args.base)
    return adapters, base_quantization(adapters, args.base_quantization)


def _fused(
    args: argparse.Namespace,
    adapters: dict[str, Path],
    quantization: QuantizationSpec | None,
    **options,
):
    from carpool.orchestrator.after_training.adapter_args import AdapterArgumentError
    from carpool.workers.after_training.fused_inference import FusedAdapters
    from carpool.workers.peft_files.peft_format import AdapterFormatError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return FusedAdapters(
            args.base,
            adapters,
            include_base=args.include_base,
            device=args.device,
            adapter_math=args.adapter_math,
            quantization=quantization,
            **options,
        )
    except AdapterFormatError as e:  # an adapter whose shapes do not fit this base
        raise AdapterArgumentError(str(e)) from e


@subcommand("eval", "eval loss and perplexity of adapters on one dataset, fused", _eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    from carpool.orchestrator.after_training import pair_eval_command
    from carpool.orchestrator.after_training.adapter_args import (
        AdapterArgumentError,
        with_exported_ranks,
    )
    from carpool.workers.base.base_model import load_tokenizer
    from carpool.workers.data.dataset import load_dataset
    from carpool.workers.spec.objective import SftObjective, format_problem

    pair_eval_command.check(args)
    adapters, quantization = _checked_adapters(args)
    adapters = with_exported_ranks(adapters)  # a DyLoRA adapter: one row per exported rank
    # The data is read and tokenized before the base loads: a bad row costs no model load.
    dataset = load_dataset(
        args.dataset, args.format, load_tokenizer(args.base), args.max_seq_length
    )
    if args.objective is None and (problem := format_problem(SftObjective(), dataset.format)):
        raise AdapterArgumentError(f"--dataset {args.dataset}: {problem} (pass --objective)")
    fused = _fused(args, adapters, quantization, micro_batch_tokens=args.micro_batch_tokens)
    if args.objective is not None:
        return pair_eval_command.run(args, fused, dataset)
    results = fused.evaluate(dataset)
    if args.json:  # one document, as every --json prints
        records = [
            {"adapter": r.name, "eval_loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}
            for r in results
        ]
        print(json.dumps(records, indent=2))
        return 0
    width = max(len("ADAPTER"), *(len(r.name) for r in results))
    print(f"{'ADAPTER':<{width}}  {'LOSS':>8}  {'PERPLEXITY':>10}  {'TOKENS':>8}")
    for r in results:
        print(f"{r.name:<{width}}  {r.loss:>8.4f}  {r.perplexity:>10.3f}  {r.tokens:>8}")
    return 0


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 is greedy), got {value}")
    return value


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER", help="DIR or NAME=DIR")
    _common_arguments(parser)
    parser.add_argument(
        "--prompts", required=True, type=Path,
        help='JSONL rows {"prompt": ..., "adapter": NAME} or {"messages": [...], "adapter": NAME}',
    )  # fmt: skip
    parser.add_argument(
        "--all-adapters", action="store_true",
        help="every prompt through every adapter (and the base with --include-base)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
    parser.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T",
        help="0 (the default) decodes greedily",
    )  # fmt: skip
    parser.add_argument("--top-p", type=_probability, default=1.0, metavar="P")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="with sampling: a completion depends on the seed, its prompt and adapter only",
    )  # fmt: skip
    parser.add_argument(
        "--batch-rows", type=positive_int, default=32, metavar="N",
        help="rows decoded together, of any adapters (default 32)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write JSONL here, not stdout")


@subcommand(
    "generate", "complete prompts through adapters, rows of many adapters in one batch",
    _generate_arguments,
)  # fmt: skip
def cmd_generate(args: argparse.Namespace) -> int:
    from carpool.orchestrator.after_training.adapter_args import AdapterArgumentError
    from carpool.orchestrator.after_training.prompt_file import read_prompts
    from carpool.workers.after_training.fused_inference import BASE

    adapters, quantization = _checked_adapters(args)
    names = [*adapters, *([BASE] if args.include_base else [])]
    if not names:
        raise AdapterArgumentError("name at least one ADAPTER, or pass --include-base")
    rows = read_prompts(args.prompts, names, args.all_adapters)
    requests, echoes = _requests(args, rows)
    fused = _fused(args, adapters, quantization)
    from carpool.workers.after_training.fused_inference import Sampling

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    completions = fused.generate(requests, sampling, batch_rows=args.batch_rows)
    out = args.out.open("w") if args.out is not None else sys.stdout
    try:
        for request, prompt, tokens in zip(requests, echoes, completions, strict=True):
            text = fused.tokenizer.decode(tokens, skip_special_tokens=True)
            out.write(
                json.dumps({"adapter": request.adapter, "prompt": prompt, "completion": text})
            )
            out.write("\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out is not None:
        print(f"wrote {len(requests)} completions to {args.out}", file=sys.stderr)
    return 0


def _requests(args: argparse.Namespace, rows: list) -> tuple[list, list]:
    """One request per (prompt, adapter), tokenized as training tokenizes prompts."""
    from carpool.workers.after_training.fused_inference import GenerationRequest
    from carpool.workers.base.base_model import load_tokenizer
    from carpool.workers.data.dataset import DatasetError, prompt_ids

    tokenizer = load_tokenizer(args.base)
    requests, echoes = [], []
    for row in rows:
        try:
            ids = tuple(prompt_ids(row.record, tokenizer))
        except ValueError as e:
            raise DatasetError(args.prompts, str(e), row.line) from e
        if not ids:
            raise DatasetError(args.prompts, "the prompt has no tokens", row.line)
        key = json.dumps(row.record, sort_keys=True)
        for adapter in row.adapters:
            requests.append(GenerationRequest(adapter, ids, key))
            echoes.append(row.shown)
    return requests, echoes
