"""The K sweep: fused / PEFT sequential, fused / floor and peak memory at each point.

Each point (jobs K x rows per job x fixed or mixed row lengths) runs
`benchmarks/engine.py` in a process of its own, so one point's memory never
shows in another's peak, and prints one line of the table.

    python benchmarks/engine_sweep.py                       # every point: K 1,8,32,64 x rows 1,4 x fixed,mixed
    python benchmarks/engine_sweep.py --points targets      # the points with targets (mixed lengths)
    python benchmarks/engine_sweep.py --device cuda --jobs 1,8,32 --seq 1024 --lengths mixed

Targets (issue "Fusion at every K"), mixed lengths: K=1 >= 0.95x PEFT; K=8 x 4
rows >= 1.2x PEFT and <= 1.15x the floor; K=32 x 1 row >= 3x PEFT and <= 1.25x
the floor; K=64: peak <= 1.2x (floor peak + adapters' weights, grads, Adam state).
Everything after `--` goes to engine.py as it is (e.g. `-- --adapter-math bmm`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).with_name("engine.py")
TARGET_POINTS = [(1, 4), (8, 4), (32, 1), (64, 1)]


def integers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def run_point(jobs: int, rows: int, lengths: str, extra: list[str]) -> dict:
    argv = [sys.executable, str(ENGINE), "--jobs", str(jobs), "--rows", str(rows)]
    argv += ["--lengths", lengths, *extra, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_line(result: dict) -> str:
    p, tps, peaks = result["point"], result["tokens_per_s"], result["peak_bytes"]
    fused_label = next(label for label in tps if "fused" in label)
    fused = tps[fused_label]
    peft = f"{fused / tps['PEFT sequential']:.2f}x" if "PEFT sequential" in tps else "-"
    bound = peaks["floor (packed)"] + result["adapter_state_bytes"]
    cells = [
        f"{p['jobs']:>4}",
        f"{p['rows']:>4}",
        f"{p['lengths']:>6}",
        f"{result['tokens_per_round']:>8}",
        f"{fused:>9.0f}",
        f"{peft:>8}",
        f"{tps['floor (packed)'] / fused:>8.2f}x",
        f"{tps['floor (packed)'] / tps['floor (padded)']:>8.2f}x",
        f"{peaks[fused_label] / 2**20:>8.0f}",
        f"{peaks[fused_label] / bound:>8.2f}x",
        f"{result['optimizer_share']:>6.1%}",
    ]
    if result.get("gpu") and result["gpu"][1]:
        achieved = result["flops_per_round"] * fused / result["tokens_per_round"]
        cells.append(f"{achieved / result['gpu'][1]:>6.1%}")
    # Other fused ways of the same run (--adapter-math, --batch-layout lists): time vs the first.
    others = [label for label in tps if "fused" in label and label != fused_label]
    cells += [f"{label}: {fused / tps[label]:.2f}x time" for label in others]
    return " ".join(cells)


HEADER = (
    "   K rows lengths tokens/rd fused t/s fused/PEFT fused/floor pad/floor fused MiB "
    "peak/bound  AdamW"
)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", choices=["grid", "targets"], default="grid")
    parser.add_argument("--jobs", type=integers, default=[1, 8, 32, 64])
    parser.add_argument("--rows", type=integers, default=[1, 4])
    parser.add_argument("--lengths", default="fixed,mixed")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (the most, if mixed)")
    args = parser.parse_args(argv)
    if args.device:
        extra += ["--device", args.device]
    if args.seq:
        extra += ["--seq", str(args.seq)]
    if args.points == "targets":
        points = [(k, r, "mixed") for k, r in TARGET_POINTS]
    else:
        points = list(itertools.product(args.jobs, args.rows, args.lengths.split(",")))
    print(f"engine.py {' '.join(extra)}".strip())
    print(HEADER + ("    MFU" if args.device == "cuda" else ""), flush=True)
    for jobs, rows, lengths in points:
        print(table_line(run_point(jobs, rows, lengths, extra)), flush=True)


if __name__ == "__main__":
    main()
