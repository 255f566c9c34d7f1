"""A beta sweep pays for its reference once: K DPO jobs on the same pairs, several epochs,
on one engine, with the reference computed per micro-batch against precomputed once.

Both runs train the same K jobs (same pairs, betas 0.05..., the same steps) on one tiny
random Llama (CPU, float32), in this process, one after the other; the precomputed run's
time includes its one pass over the pairs before the first step. The two alternate for
`--trials` rounds (this machine is noisy); reported: each one's median seconds, its
reference forwards, and the ratios.

    python benchmarks/shared_reference.py [--jobs 8] [--pairs 32] [--epochs 3] [--batch 8]
        [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from preference import write_pairs  # the same kind of pairs as benchmarks/preference.py


def train(base: Path, data: Path, args: argparse.Namespace, precompute: bool) -> tuple[float, int]:
    """Seconds to add and train every job, and the reference forwards it took."""
    from carpool.workers.spec.job_spec import JobSpec
    from carpool.workers.training.engine import Engine

    engine = Engine(str(base), device="cpu")
    specs = [
        JobSpec.model_validate(
            {
                "name": f"beta-{i}",
                "base_model": str(base),
                "dataset": {"path": str(data)},
                "objective": {
                    "type": "dpo",
                    "beta": 0.05 * (i + 1),
                    "precompute_ref_log_probs": precompute,
                },
                "adapter": {"r": 8, "lora_alpha": 16},
                "training": {
                    "num_epochs": args.epochs,
                    "batch_size": args.batch,
                    "learning_rate": 1e-3,
                    "max_seq_length": 64,
                },
            }
        )
        for i in range(args.jobs)
    ]
    start = time.perf_counter()  # the base is loaded: the clock times the jobs alone
    for spec in specs:
        engine.add_job(spec)
    while engine.active_jobs():
        engine.train_round()
    return time.perf_counter() - start, engine.reference_passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the shared dataset")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    from carpool.workers.base.tiny_base import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(root / "base", hidden_size=128, num_layers=4)
        data = write_pairs(root / "pairs.jsonl", 0, args.pairs)
        train(base, data, args, precompute=False)  # warm-up: first-call costs
        runs: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
        for _ in range(args.trials):
            for precompute in (False, True):
                runs[precompute].append(train(base, data, args, precompute))
        (live, live_passes), (kept, kept_passes) = (
            (statistics.median(s for s, _ in runs[p]), runs[p][0][1]) for p in (False, True)
        )

    print(
        f"K={args.jobs} DPO jobs (betas differ) on the same {args.pairs} pairs, "
        f"{args.epochs} epochs of {args.batch}-pair steps (tiny Llama, CPU)"
    )
    print(f"{'reference':<34} {'median s':>8} {'reference forwards':>19}  ({args.trials} trials)")
    print(f"{'per micro-batch, as it trains':<34} {live:>8.2f} {live_passes:>19}")
    print(f"{'precompute_ref_log_probs':<34} {kept:>8.2f} {kept_passes:>19}")
    print(f"precomputed / per micro-batch: time {kept / live:.2f}x, forwards "
          f"{kept_passes / max(live_passes, 1):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
