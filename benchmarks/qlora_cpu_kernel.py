"""What the exact 4-bit kernel costs a no-grad forward on a CPU with AVX512-BF16.

On such a CPU bitsandbytes repacks an eval-mode 4-bit module's weight for a bf16
inference kernel the first time an input needs no grad; carpool turns that off on
every 4-bit module it loads (`keep_4bit_kernel_exact`), so `carpool eval`,
`generate` and serving compute on the kernel training uses and match PEFT's
training. This times the same no-grad forward (one batch of random tokens) on one
4-bit base with the repack off (exact: carpool) and on (fast), in turn, and prints
the ratio and how far apart the two losses are. On a CPU without AVX512-BF16 there
is one kernel, and the script says so.

    python benchmarks/qlora_cpu_kernel.py [--hidden 1024] [--layers 4] [--rows 8]
        [--seq 256] [--compute bfloat16] [--trials 5]

`--seq 1` times a decoding step's shape (one new token per row, no KV cache).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load(base: Path, compute: str, fast: bool) -> torch.nn.Module:
    """The base in 4 bits as carpool loads it; with `fast`, the repack allowed again."""
    from bitsandbytes.functional import has_avx512bf16
    from carpool.workers.base.base_model import load_base
    from carpool.workers.base.quantization import is_4bit
    from carpool.workers.spec.job_spec import QuantizationSpec

    spec = QuantizationSpec(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    dtype = getattr(torch, compute)
    model = load_base(str(base), device=torch.device("cpu"), dtype=dtype, quantization=spec)
    if fast:
        for module in model.modules():
            if is_4bit(module):
                module.support_avx512bf16_for_cpu = has_avx512bf16()
    return model


def forward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float | None]:
    """(seconds, mean next-token cross-entropy or None for one-token rows) of one no-grad
    forward. One-token rows are a decoding step's shape (without its KV cache)."""
    started = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    seconds = time.perf_counter() - started
    if ids.shape[1] < 2:
        return seconds, None
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
    return seconds, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compute", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    from bitsandbytes.functional import has_avx512bf16
    from carpool.workers.base.tiny_base import build_tiny_base

    if not has_avx512bf16():
        print("this CPU has no AVX512-BF16: one kernel, nothing to compare")
        return
    with tempfile.TemporaryDirectory() as tmp:
        heads = max(1, args.hidden // 64)
        # The repacked layout takes output sizes in whole blocks: a multiple of 128.
        intermediate = max(128, args.hidden * 11 // 4 // 128 * 128)
        base = build_tiny_base(
            Path(tmp) / "base", hidden_size=args.hidden, num_layers=args.layers,
            num_heads=heads, num_kv_heads=heads, intermediate_size=intermediate,
        )  # fmt: skip
        models = {"exact": load(base, args.compute, False), "fast": load(base, args.compute, True)}
        ids = torch.randint(
            0, 512, (args.rows, args.seq), generator=torch.Generator().manual_seed(0)
        )
        losses = {name: forward(model, ids)[1] for name, model in models.items()}  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.trials):
            for name, model in models.items():
                seconds[name].append(forward(model, ids)[0])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"hidden={args.hidden} layers={args.layers} rows={args.rows} seq={args.seq} "
          f"compute={args.compute} trials={args.trials} threads={torch.get_num_threads()}")  # fmt: skip
    for name in models:
        loss = "-" if losses[name] is None else f"{losses[name]:.6f}"
        print(f"{name:<6} median {median[name]:.4f} s  min {min(seconds[name]):.4f} s  "
              f"loss {loss}")  # fmt: skip
    apart = ""
    if losses["exact"] is not None:
        gap = abs(losses["exact"] - losses["fast"]) / losses["exact"]
        apart = f"; losses apart {gap:.1e} relative"
    print(f"exact/fast time: {median['exact'] / median['fast']:.2f}x{apart}")


if __name__ == "__main__":
    main()
