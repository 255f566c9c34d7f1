"""Serving many adapters: `carpool serve` against PEFT serving one request at a time.

One random-init Llama-shaped base (hidden 256, 4 layers by default) and K LoRA
adapters of mixed ranks and targets. R requests, of the adapters in turn, arrive at
once:

  carpool  a local carpool (its own Ray head) and `carpool serve --base B NAME=DIR...`:
           the requests go over HTTP, streamed, from a loopback client that keeps at
           most `--concurrency` open (OpenAI's async client). Rows of every adapter
           decode together; new ones join between steps.
  peft     one PeftModel holding all K adapters, in this process, the same requests
           one at a time: `set_adapter`, then `generate`.

Both decode greedily, at most `--new-tokens` each (a row that reaches EOS stops on
both sides, so both generate the same tokens). Prints generated tokens/s for each and
the ratio (carpool / PEFT: above 1 means carpool is faster), and each side's p50/p99
latency and time to first token, counted from when the requests arrive.

    python benchmarks/serve.py [--adapters 16] [--requests 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from after_training import build_adapters, words  # the same base and adapters
from carpool.orchestrator.cli.main import main as carpool
from carpool.orchestrator.runtime.client import Client
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data.dataset import prompt_ids
from peft import PeftModel
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def ask_carpool(url: str, key: str, requests: list[tuple[str, str]], args) -> dict:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(args.concurrency)
    start = time.perf_counter()

    async def one(model: str, prompt: str) -> tuple[float, float, int]:
        async with gate:
            stream = await api.completions.create(
                model=model, prompt=prompt, max_tokens=args.new_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            first, tokens = None, 0
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        done = time.perf_counter() - start
        return (first if first is not None else done), done, tokens

    results = await asyncio.gather(*(one(m, p) for m, p in requests))
    wall = time.perf_counter() - start
    await api.close()
    return summary(results, wall)


class FirstToken(LogitsProcessor):
    """Notes when `generate` picks its first token."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def ask_peft(base: Path, adapters: dict[str, Path], requests, args) -> dict:
    tok = load_tokenizer(str(base))
    names = list(adapters)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapters[names[0]], names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapters[name], name)
    model.eval()
    results = []
    start = time.perf_counter()
    with torch.no_grad():
        for name, prompt in requests:
            ids = prompt_ids({"prompt": prompt}, tok)
            model.set_adapter(name)
            first = FirstToken()
            out = model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id, logits_processor=LogitsProcessorList([first]),
            )  # fmt: skip
            new = out[0, len(ids) :].tolist()
            tokens = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
            done = time.perf_counter() - start
            results.append((first.at - start, done, tokens))
    return summary(results, time.perf_counter() - start)


def summary(results: list[tuple[float, float, int]], wall: float) -> dict:
    firsts, dones, tokens = zip(*results, strict=True)
    return {
        "wall": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
        "ttft_p50": statistics.median(firsts), "ttft_p99": percentile(list(firsts), 0.99),
        "latency_p50": statistics.median(dones), "latency_p99": percentile(list(dones), 0.99),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="open requests at most")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--cpus", type=int, default=2, help="the replica's CPUs (and PEFT's threads)"
    )
    parser.add_argument(
        "--stream-interval", type=float, default=None,
        help="serve.stream_interval_s (default: the operator config's default)",
    )  # fmt: skip
    parser.add_argument("--address", default=None, help="a running Ray to use (default: start one)")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapters = build_adapters(root, args.adapters, args.hidden, args.layers)
        names = list(adapters)
        requests = [(names[i % len(names)], words(i * 3, 4 + i % 20)) for i in range(args.requests)]
        port = free_port()
        config = {"state_dir": str(root / "state"), "serve": {
            "port": port, "cpus_per_replica": args.cpus, "max_adapters_per_replica": len(names),
            "max_batch_rows": max(args.concurrency, 1), "max_completion_tokens": args.new_tokens}}  # fmt: skip
        if args.stream_interval is not None:
            config["serve"]["stream_interval_s"] = args.stream_interval
        (root / "operator.yaml").write_text(yaml.safe_dump(config))
        client = Client.up(root / "operator.yaml", address=args.address, num_cpus=args.cpus)
        try:
            named = [f"{n}={p}" for n, p in adapters.items()]
            if carpool(
                ["serve", "--state-dir", str(client.state_dir), "--base", str(base), *named]
            ):
                sys.exit("carpool serve failed")
            key = (client.state_dir / "serve" / "api_key").read_text().strip()
            url = f"http://127.0.0.1:{port}/v1"
            asyncio.run(ask_carpool(url, key, requests, args))  # warm: one round untimed
            ours = asyncio.run(ask_carpool(url, key, requests, args))
        finally:
            client.down()
        theirs = ask_peft(base, adapters, requests, args)
    interval = args.stream_interval
    if interval is None:
        from carpool.orchestrator.control.operator_config import ServeConfig

        interval = ServeConfig().stream_interval_s
    print(f"{args.adapters} adapters, {args.requests} requests (at most {args.concurrency} open), "
          f"<= {args.new_tokens} new tokens each, hidden {args.hidden}, {args.layers} layers, "
          f"{args.cpus} CPUs, stream interval {interval} s")  # fmt: skip
    for name, r in (("carpool", ours), ("peft", theirs)):
        print(f"  {name:<8} {r['tokens']:>6} tokens in {r['wall']:7.2f} s = {r['tokens_per_s']:8.1f} "
              f"tokens/s; latency p50 {r['latency_p50']:.2f} s p99 {r['latency_p99']:.2f} s; "
              f"TTFT p50 {r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s")  # fmt: skip
    print(f"tokens/s: carpool serve / PEFT one request at a time = "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
