"""Fused multi-job training against PEFT one job at a time, and against the floor.

Runs the same K jobs three ways in one process, one after another:
  (a) carpool: all K jobs in one engine, one fused forward/backward per round;
  (b) PEFT sequential: each job alone with PEFT + AdamW, one after another;
  (c) floor: the base's own forward+backward over the same tokens with no
      adapter (frozen weights, gradients flowing to the embeddings): the time
      no LoRA trainer can beat.
Prints tokens/s of each, the ratios a/b and a/c, and peak memory.
With --gradient-checkpointing, also (a) with each decoder layer recomputed in
the backward; with --loss-chunk-tokens N, also (a) with the loss computed N
tokens at a time: each one's cost in time and saving in peak memory against (a).
With --adapter-math loop,bmm,grouped_mm, (a) once per way of computing the LoRA
terms, side by side; the first is the headline and the others' time is given
against it.

    python benchmarks/engine.py                 # CPU defaults
    python benchmarks/engine.py --device cuda   # bf16, 1B Llama-shaped model
    python benchmarks/engine.py --gradient-checkpointing --loss-chunk-tokens 256
    python benchmarks/engine.py --adapter-math loop,bmm,grouped_mm
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from carpool.workers.adapter_math import ADAPTER_MATHS
from carpool.workers.base_model import default_dtype
from carpool.workers.dataset import TokenizedDataset, TokenizedRow
from carpool.workers.engine import Engine
from carpool.workers.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from carpool.workers.tiny_base import train_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# Shapes: a small Llama for a 2-core CPU; Llama-3.2-1B's shape on CUDA.
MODEL_SHAPES = {
    "cpu": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
    ),
    "cuda": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    ),
}  # fmt: skip


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc), unlike RSS,
    which keeps memory an earlier phase freed and so hides later phases' use."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak GPU allocation, or peak heap in use on CPU, above a baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = heap_in_use()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, heap_in_use() - self._base)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_base(device: torch.device, root: Path) -> Path:
    """Save a random-init Llama of the device's benchmark shape, plus a tokenizer."""
    shape = MODEL_SHAPES[device.type]
    tokenizer = train_tokenizer(["benchmark text only sets the special tokens"], vocab_size=300)
    config = LlamaConfig(
        **shape, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(default_dtype(device))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    del model
    return root


def synthetic_dataset(vocab: int, rows: int, seq: int, seed: int) -> TokenizedDataset:
    """Rows of exactly `seq` random tokens, every token trained."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(3, vocab, (rows, seq), generator=gen).tolist()
    return TokenizedDataset(
        rows=tuple(TokenizedRow(tuple(r), tuple(r)) for r in data),
        format="text",
        truncated_rows=0,
        source=Path(f"synthetic-{seed}"),
    )


def timed_rounds(
    one_round: Callable[[], None], rounds: int, warmup: int, device: torch.device
) -> float:
    """Seconds for `rounds` rounds (each: one step of every job), after `warmup` more."""
    for _ in range(warmup):
        one_round()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(rounds):
        one_round()
    synchronize(device)
    return time.perf_counter() - start


def job_configs(args: argparse.Namespace, base: Path) -> list[JobSpec]:
    # The engine is handed each job's rows: the dataset path is only a name.
    return [
        JobSpec(
            name=f"job{i}",
            base_model=str(base),
            dataset=DatasetSpec(path=Path(f"synthetic-{i}.jsonl")),
            adapter=AdapterSpec(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"),
            training=TrainingSpec(
                max_steps=10_000,
                batch_size=args.rows,
                learning_rate=1e-4,
                max_seq_length=args.seq,
                shuffle=False,
                seed=i,
            ),
        )  # fmt: skip
        for i in range(args.jobs)
    ]


def fused_round(args, base: Path, datasets, device, **engine_options) -> Callable[[], None]:
    """(a) One engine round: every job's step in fused micro-batches."""
    engine = Engine(
        str(base), device=device, micro_batch_tokens=args.micro_batch_tokens, **engine_options
    )
    for config, data in zip(job_configs(args, base), datasets, strict=True):
        engine.add_job(config, dataset=data)
    return engine.train_round


def peft_sequential_round(args, base: Path, datasets, device) -> Callable[[], None]:
    """(b) Each job alone with PEFT: one step of each job in turn, base loaded once."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=default_dtype(device)).to(device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    names = [f"job{i}" for i in range(args.jobs)]
    peft_model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    optimizers, batches = {}, {}
    for name, data in zip(names, datasets, strict=True):
        peft_model.set_adapter(name)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4)
        batches[name] = torch.tensor([r.input_ids for r in data.rows[: args.rows]], device=device)

    def one_round() -> None:
        for name in names:
            peft_model.set_adapter(name)
            ids = batches[name]
            peft_model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()

    return one_round


def floor_round(args, base: Path, datasets, device) -> Callable[[], None]:
    """(c) The base alone over the same tokens and micro-batches: frozen weights,
    backward computing only the activation gradients that LoRA training needs."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=default_dtype(device)).to(device)
    model.eval().requires_grad_(False)
    ids = torch.tensor(
        [r.input_ids for data in datasets for r in data.rows[: args.rows]], device=device
    )
    rows_per_micro = (
        len(ids) if args.micro_batch_tokens is None else max(1, args.micro_batch_tokens // args.seq)
    )
    embed = model.get_input_embeddings()

    def one_round() -> None:
        for chunk in ids.split(rows_per_micro):
            embeds = embed(chunk).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=chunk, use_cache=False).loss.backward()

    return one_round


def adapter_maths(text: str) -> list[str]:
    paths = text.split(",")
    for path in paths:
        if path not in ADAPTER_MATHS:
            raise argparse.ArgumentTypeError(f"{path!r} is not one of {', '.join(ADAPTER_MATHS)}")
    return paths


def fused_label(adapter_math: str) -> str:
    return "carpool fused" if adapter_math == "auto" else f"fused {adapter_math}"


CHECKPOINTED = "fused + grad ckpt"
CHUNKED = "fused + chunked loss"
BOTH = "fused + both"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=None, help="rows per job per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials; best counts")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None,
        help="fused and floor micro-batch budget (default: 1024 on CPU, whole round on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="also time the fused engine with gradient checkpointing",
    )  # fmt: skip
    parser.add_argument(
        "--loss-chunk-tokens", type=int, default=None, metavar="N",
        help="also time the fused engine with the loss computed N tokens at a time",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-math", type=adapter_maths, default=["auto"], metavar="PATHS",
        help=f"comma-separated ways to compute LoRA terms, each timed ({', '.join(ADAPTER_MATHS)})",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.rows = args.rows or (2 if cuda else 4)
    args.seq = args.seq or (512 if cuda else 128)
    args.steps = args.steps or (5 if cuda else 2)
    if args.micro_batch_tokens is None and not cuda:
        # On CPU, smaller matmuls stay in cache: measured faster for fused and floor alike.
        args.micro_batch_tokens = 1024

    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(device, Path(tmp))
        vocab = MODEL_SHAPES[device.type]["vocab_size"]
        datasets = [
            synthetic_dataset(vocab, args.rows * 4, args.seq, seed=i) for i in range(args.jobs)
        ]
        ways = {
            fused_label(path): fused_round(args, base, datasets, device, adapter_math=path)
            for path in args.adapter_math
        }
        ways["PEFT sequential"] = peft_sequential_round(args, base, datasets, device)
        ways["floor (base fwd+bwd)"] = floor_round(args, base, datasets, device)
        # Opt-in, and last: a fourth engine in memory slows the others' rounds.
        if args.gradient_checkpointing:
            ways[CHECKPOINTED] = fused_round(
                args, base, datasets, device, gradient_checkpointing=True
            )
        if args.loss_chunk_tokens:
            ways[CHUNKED] = fused_round(
                args, base, datasets, device, loss_chunk_tokens=args.loss_chunk_tokens
            )
        if args.gradient_checkpointing and args.loss_chunk_tokens:
            ways[BOTH] = fused_round(
                args, base, datasets, device,
                gradient_checkpointing=True, loss_chunk_tokens=args.loss_chunk_tokens,
            )  # fmt: skip
        peaks = {}
        for label, one_round in ways.items():  # warm up, and measure memory on its own
            with PeakMemory(device) as mem:
                timed_rounds(one_round, 1, args.warmup, device)
            peaks[label] = mem.peak
        # Interleaved trials, best of each: the ways share the machine's noise.
        best = {label: float("inf") for label in ways}
        for _ in range(args.trials):
            for label, one_round in ways.items():
                best[label] = min(best[label], timed_rounds(one_round, args.steps, 0, device))
        tokens = args.jobs * args.rows * args.seq * args.steps
        results = {label: (tokens / best[label], peaks[label]) for label in ways}

    dtype = default_dtype(device)
    print(
        f"device={device.type} dtype={str(dtype).removeprefix('torch.')} jobs={args.jobs} "
        f"rows/job/step={args.rows} seq={args.seq} r={args.rank} all-linear "
        f"micro_batch_tokens={args.micro_batch_tokens} steps={args.steps} x best of {args.trials}"
    )
    headline = fused_label(args.adapter_math[0])
    print(f"{'way':<24}{'tokens/s':>12}{'peak MiB':>12}")
    for label, (tps, peak) in results.items():
        print(f"{label:<24}{tps:>12.0f}{peak / 2**20:>12.0f}")
    fused = results[headline][0]
    for path in args.adapter_math[1:]:
        print(f"{path} / {args.adapter_math[0]}: {fused / results[fused_label(path)][0]:.2f}x time")
    print(f"fused / PEFT sequential: {fused / results['PEFT sequential'][0]:.2f}x tokens/s")
    floor_time = 1 / results["floor (base fwd+bwd)"][0]
    print(f"fused time / floor time: {(1 / fused) / floor_time:.2f}x")
    for label, short in ((CHECKPOINTED, "grad ckpt"), (CHUNKED, "chunked loss"), (BOTH, "both")):
        if label in results:
            tps, peak = results[label]
            print(
                f"{short} / fused: {fused / tps:.2f}x time, "
                f"{peak / max(results[headline][1], 1):.2f}x peak memory"
            )


if __name__ == "__main__":
    main()
