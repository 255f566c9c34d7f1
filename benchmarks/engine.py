"""Fused multi-job training against PEFT one job at a time, and against the floor.

Runs the same K jobs three ways in one process, one after another:
  (a) carpool: all K jobs in one engine, one fused forward/backward per round;
  (b) PEFT sequential: each job alone with PEFT + AdamW, one after another;
  (c) floor: the base's own forward+backward over the same real tokens with no
      adapter and no padding (rows packed, attention within each row; frozen
      weights, gradients flowing to the embeddings): the time no LoRA trainer
      can beat. The same with padded rows is timed beside it.
Prints tokens/s of each (real tokens), the ratios a/b and a/c, peak memory
against the floor's plus the adapters' weights, gradients and Adam state,
and on CUDA the model FLOPs utilization (MFU).
Rows are `--seq` tokens each, or with `--lengths mixed` drawn uniformly from
`--min-seq` to `--seq`; each job's step sees the same rows every round.
With --batch-layout packed,padded, (a) once per layout.
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
    python benchmarks/engine.py --jobs 32 --rows 1 --seq 512 --lengths mixed --batch-layout packed,padded
    python benchmarks/engine_sweep.py           # the K sweep (1, 8, 32, 64 jobs)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from carpool.workers.bank.adapter_math import ADAPTER_MATHS
from carpool.workers.base.base_model import default_dtype
from carpool.workers.base.tiny_base import train_tokenizer
from carpool.workers.data.batch_layout import BATCH_LAYOUTS
from carpool.workers.data.dataset import TokenizedDataset, TokenizedRow
from carpool.workers.data.fused_batch import plan_micro_batches, step_rows
from carpool.workers.data.row_attention import use_row_attention
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from carpool.workers.training.engine import Engine
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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


def synthetic_dataset(vocab: int, rows: int, lengths: list[int], seed: int) -> TokenizedDataset:
    """`rows` rows of random tokens, of these lengths, every token trained."""
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths[:rows]]
    return TokenizedDataset(
        rows=tuple(TokenizedRow(tuple(r), tuple(r)) for r in data),
        format="text",
        truncated_rows=0,
        source=Path(f"synthetic-{seed}"),
    )


def row_lengths(args: argparse.Namespace, job: int) -> list[int]:
    """A job's row lengths: all `--seq`, or uniform in [--min-seq, --seq] (seeded per job)."""
    if args.lengths == "fixed":
        return [args.seq] * args.rows
    rng = random.Random(1000 + job)
    return [rng.randint(args.min_seq, args.seq) for _ in range(args.rows)]


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


def adapter_state_bytes(args, base: Path, datasets, device) -> int:
    """The K adapters' weights, gradients and two AdamW moments, in bytes."""
    engine = Engine(str(base), device=device)
    for config, data in zip(job_configs(args, base), datasets, strict=True):
        engine.add_job(config, dataset=data)
    weights = sum(
        p.numel() * p.element_size() for j in engine.jobs.values() for p in j.adapter.parameters()
    )
    return 4 * weights


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
        batches[name] = padded_batch([r.input_ids for r in data.rows[: args.rows]], device)

    def one_round() -> None:
        for name in names:
            peft_model.set_adapter(name)
            ids, mask, labels = batches[name]
            peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()

    return one_round


def optimizer_seconds(train_round: Callable[[], None], device: torch.device) -> float:
    """One AdamW step of every job of a fused engine, as `train_round` runs them (one
    optimizer per job), best of 3: the most a single optimizer pass could save."""
    engine = train_round.__self__
    params = [p for j in engine.jobs.values() for p in j.adapter.parameters()]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for j in engine.jobs.values():
            j.optimizer.step()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    for p in params:
        p.grad = None
    return best


def padded_batch(rows: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Rows right-padded as a Trainer's collator does: ids, attention mask, labels (-100)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def floor_round(args, base: Path, datasets, device, packed: bool) -> Callable[[], None]:
    """(c) The base alone over the same rows in micro-batches of the same budget: frozen
    weights, backward computing only the activation gradients that LoRA training needs.
    Packed: each micro-batch's rows end to end, attention within each row; else padded."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=default_dtype(device)).to(device)
    model.eval().requires_grad_(False)
    if packed:
        use_row_attention(model)
    rows = [
        r
        for i, data in enumerate(datasets)
        for r in step_rows(f"j{i}", data.rows, range(args.rows))
    ]
    inputs = []
    for micro in plan_micro_batches(rows, args.micro_batch_tokens, packed=packed):
        ids = [r.row.input_ids for r in micro]
        if packed:
            flat = torch.tensor([t for r in ids for t in r], device=device).view(1, -1)
            positions = torch.tensor([p for r in ids for p in range(len(r))], device=device)
            inputs.append(
                {"input_ids": flat, "position_ids": positions.view(1, -1), "labels": flat}
            )
        else:
            padded, _, labels = padded_batch(ids, device)
            inputs.append({"input_ids": padded, "labels": labels})
    embed = model.get_input_embeddings()

    def one_round() -> None:
        for batch in inputs:
            embeds = embed(batch["input_ids"]).detach().requires_grad_()
            rest = {k: v for k, v in batch.items() if k != "input_ids"}
            model(inputs_embeds=embeds, **rest, use_cache=False).loss.backward()

    return one_round


def model_flops(base: Path, datasets, args, trainable_per_job: int) -> float:
    """FLOPs of one round: 6 N_trainable + 4 N_frozen per token (forward 2N; backward 2N
    for activation gradients, plus 2N for weight gradients of trainable weights only)
    plus causal attention, 6 * layers * hidden * L^2 per row of length L (QK^T and AV,
    2 L^2 hidden each, halved by the causal mask; backward twice the forward)."""
    config = AutoConfig.from_pretrained(base)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    frozen = (
        sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    )
    flops = 0.0
    for data in datasets:
        for r in data.rows[: args.rows]:
            n = len(r.input_ids)
            flops += n * (6 * trainable_per_job + 4 * frozen) + 6 * layers * hidden * n * n
    return flops


# Dense bf16 tensor-core peaks (datasheet, SXM) for the MFU line.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def adapter_maths(text: str) -> list[str]:
    paths = text.split(",")
    for path in paths:
        if path not in ADAPTER_MATHS:
            raise argparse.ArgumentTypeError(f"{path!r} is not one of {', '.join(ADAPTER_MATHS)}")
    return paths


def batch_layouts(text: str) -> list[str]:
    layouts = text.split(",")
    for layout in layouts:
        if layout not in BATCH_LAYOUTS:
            raise argparse.ArgumentTypeError(f"{layout!r} is not one of {', '.join(BATCH_LAYOUTS)}")
    return layouts


def fused_label(adapter_math: str, batch_layout: str = "auto") -> str:
    parts = [p for p in (adapter_math, batch_layout) if p != "auto"]
    return "carpool fused" if not parts else f"fused {' '.join(parts)}"


PEFT = "PEFT sequential"
FLOOR = "floor (packed)"
FLOOR_PADDED = "floor (padded)"


CHECKPOINTED = "fused + grad ckpt"
CHUNKED = "fused + chunked loss"
BOTH = "fused + both"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rows", type=int, default=None, help="rows per job per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (the most, if mixed)")
    parser.add_argument("--lengths", choices=["fixed", "mixed"], default="fixed")
    parser.add_argument("--min-seq", type=int, default=16, help="shortest row with --lengths mixed")
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
    parser.add_argument(
        "--batch-layout", type=batch_layouts, default=["auto"], metavar="LAYOUTS",
        help=f"comma-separated micro-batch layouts, each timed ({', '.join(BATCH_LAYOUTS)})",
    )  # fmt: skip
    parser.add_argument(
        "--no-peft", action="store_true", help="skip PEFT sequential (slow at K=64)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.rows = args.rows or (2 if cuda else 4)
    args.seq = args.seq or (512 if cuda else 128)
    args.steps = args.steps or (5 if cuda else 2)
    if args.micro_batch_tokens is None and not cuda:
        # On CPU, smaller matmuls stay in cache: measured faster for fused and floor alike.
        args.micro_batch_tokens = 1024
    return args


def measure(args: argparse.Namespace) -> dict:
    """Time every way side by side; returns tokens/s and peak bytes per way, and the point."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(device, Path(tmp))
        vocab = MODEL_SHAPES[device.type]["vocab_size"]
        datasets = [
            synthetic_dataset(vocab, args.rows, row_lengths(args, i), seed=i)
            for i in range(args.jobs)
        ]
        ways = {
            fused_label(path, layout): fused_round(
                args, base, datasets, device, adapter_math=path, batch_layout=layout
            )
            for path in args.adapter_math
            for layout in args.batch_layout
        }
        if not args.no_peft:
            ways[PEFT] = peft_sequential_round(args, base, datasets, device)
        ways[FLOOR] = floor_round(args, base, datasets, device, packed=True)
        ways[FLOOR_PADDED] = floor_round(args, base, datasets, device, packed=False)
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
        headline = fused_label(args.adapter_math[0], args.batch_layout[0])
        optimizer = optimizer_seconds(ways[headline], device)
        del ways
        gc.collect()
        adapters = adapter_state_bytes(args, base, datasets, device)
        trainable_per_job = adapters // 4 // args.jobs // 4  # 4-byte float32 adapter weights
        flops = model_flops(base, datasets, args, trainable_per_job)
    tokens = sum(len(r.input_ids) for d in datasets for r in d.rows) * args.steps
    return {
        "point": {
            k: getattr(args, k)
            for k in (
                "device",
                "jobs",
                "rows",
                "seq",
                "lengths",
                "min_seq",
                "rank",
                "steps",
                "trials",
                "micro_batch_tokens",
            )
        },  # fmt: skip
        "dtype": str(default_dtype(device)).removeprefix("torch."),
        "tokens_per_round": tokens // args.steps,
        "tokens_per_s": {label: tokens / t for label, t in best.items()},
        "peak_bytes": peaks,
        "adapter_state_bytes": adapters,
        "optimizer_share": optimizer / (best[headline] / args.steps),
        "flops_per_round": flops,
        "gpu": peak_flops(device) if device.type == "cuda" else None,
    }


def report(args: argparse.Namespace, result: dict) -> None:
    tps, peaks = result["tokens_per_s"], result["peak_bytes"]
    p = result["point"]
    print(
        f"device={p['device']} dtype={result['dtype']} jobs={p['jobs']} rows/job/step={p['rows']} "
        f"lengths={p['lengths']} seq={p['seq']} r={p['rank']} all-linear "
        f"micro_batch_tokens={p['micro_batch_tokens']} steps={p['steps']} x best of {p['trials']}"
    )
    print(f"{'way':<24}{'tokens/s':>12}{'peak MiB':>12}")
    for label in tps:
        print(f"{label:<24}{tps[label]:>12.0f}{peaks[label] / 2**20:>12.0f}")
    headline = fused_label(args.adapter_math[0], args.batch_layout[0])
    fused = tps[headline]
    for label in tps:
        if label.startswith(("fused ", "carpool fused")) and label != headline:
            if label in (CHECKPOINTED, CHUNKED, BOTH):
                continue
            print(f"{label} / {headline}: {fused / tps[label]:.2f}x time")
    if PEFT in tps:
        print(f"fused / PEFT sequential: {fused / tps[PEFT]:.2f}x tokens/s")
    print(f"fused time / floor time: {tps[FLOOR] / fused:.2f}x")
    print(f"padded floor time / floor time: {tps[FLOOR] / tps[FLOOR_PADDED]:.2f}x")
    bound = peaks[FLOOR] + result["adapter_state_bytes"]
    print(
        f"fused peak / (floor peak + adapters' weights, grads, Adam state = "
        f"{bound / 2**20:.0f} MiB): {peaks[headline] / bound:.2f}x"
    )
    print(f"AdamW steps of the {p['jobs']} jobs: {result['optimizer_share']:.1%} of a fused round")
    if result["gpu"]:
        name, peak = result["gpu"]
        if peak:
            for label in (headline, FLOOR):
                achieved = result["flops_per_round"] * tps[label] / result["tokens_per_round"]
                print(f"MFU {label} on {name}: {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s")
        else:
            print(f"MFU: no bf16 peak on record for {name}")
    for label, short in ((CHECKPOINTED, "grad ckpt"), (CHUNKED, "chunked loss"), (BOTH, "both")):
        if label in tps:
            print(
                f"{short} / fused: {fused / tps[label]:.2f}x time, "
                f"{peaks[label] / max(peaks[headline], 1):.2f}x peak memory"
            )


def main() -> None:
    args = parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        report(args, result)


if __name__ == "__main__":
    main()
