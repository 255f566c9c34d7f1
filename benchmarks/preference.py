"""K DPO jobs through one `carpool train` against TRL's DPOTrainer run one job at a time.

Each job has its own pairs and beta, on one tiny random Llama (CPU, float32); both paths
train the same LoRA on the same pairs for the same steps with the same settings (TRL's
bf16 autocast and gradient checkpointing off, as carpool runs). Whole processes are
timed, as a user runs them: `carpool train` once with all K job files, and one TRL
process per job, one after another. The time before each path's first step (imports,
loading, tokenizing) is reported apart from its training. A third, in-process run of the
same K jobs on one engine times the share of each round spent in the shared reference
pass (one no-grad base-only forward per micro-batch for every job's pairs).

    python benchmarks/preference.py [--jobs 8] [--steps 30] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "looked",
    "at",
    "quick",
    "brown",
    "fox",
    "jumped",
    "over",
    "lazy",
    "dog",
]


def write_pairs(path: Path, job: int, count: int) -> Path:
    rows = []
    for i in range(count):
        k = job * 7 + i
        prompt = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(4 + k % 5))
        chosen = " " + " ".join(WORDS[(k * 3 + j) % len(WORDS)] for j in range(3 + k % 4))
        rejected = " " + " ".join(WORDS[(k * 5 + j) % len(WORDS)] for j in range(2 + k % 6))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected + " no"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def job_spec(base: Path, data: Path, name: str, beta: float, args: argparse.Namespace) -> dict:
    return {
        "name": name,
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "objective": {"type": "dpo", "beta": beta},
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.pairs,
            "learning_rate": 1e-3,
            "shuffle": False,
            "max_seq_length": 64,
            "save_steps": 10**6,
        },
    }


def timed_lines(command: list[str], marker: str) -> tuple[float, float | None, str]:
    """Wall time of `command` and when its first output line holding `marker` came."""
    start = time.perf_counter()
    first = None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if first is None and marker in line:
            first = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{command[:3]} failed:\n{''.join(out[-20:])}")
    return time.perf_counter() - start, first, "".join(out)


def trl_child(spec_path: Path) -> None:
    """One job through TRL's DPOTrainer, as a TRL user would run it: prints FIRST_STEP."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(spec_path.read_text())
    t, a = spec["training"], spec["adapter"]
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["dataset"]["path"]).read_text().splitlines()]

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                print("FIRST_STEP", flush=True)

    config = trl.DPOConfig(
        output_dir=str(spec_path.parent / f"trl-{spec['name']}"),
        per_device_train_batch_size=t["batch_size"],
        max_steps=t["max_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type="constant",
        max_length=t["max_seq_length"],
        beta=spec["objective"]["beta"],
        max_grad_norm=0.0,  # no clipping, as the job asks none
        train_sampling_strategy="sequential",
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=10**6,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=a["r"], lora_alpha=a["lora_alpha"], target_modules=a["target_modules"], lora_dropout=0.0
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[FirstStep()],
    )
    trainer.train()
    trainer.save_model(str(spec_path.parent / f"trl-{spec['name']}" / "adapter"))


def reference_share(paths: list[Path]) -> tuple[float, int]:
    """The share of K jobs' round time spent in the shared reference pass (in process)."""
    from carpool.orchestrator.spec_check.validation import validate_files
    from carpool.workers.training.engine import Engine

    specs = validate_files(paths)
    engine = Engine(specs[0].base_model, device="cpu")
    for spec in specs:
        engine.add_job(spec)
    spent = [0.0]
    reference = engine.references.logps

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return reference(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    engine.references.logps = timed
    engine.train_round()  # warm-up: first-call costs
    spent[0] = 0.0
    passes_before = engine.reference_passes
    start = time.perf_counter()
    rounds = 0
    while engine.active_jobs() and rounds < 5:
        engine.train_round()
        rounds += 1
    total = time.perf_counter() - start
    return spent[0] / total, (engine.reference_passes - passes_before) // max(rounds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (batch_size)")
    parser.add_argument("--trl-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child is not None:
        trl_child(args.trl_child)
        return

    import yaml
    from carpool.workers.base.tiny_base import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_base(root / "base", hidden_size=128, num_layers=4)
        paths = []
        for i in range(args.jobs):
            data = write_pairs(root / f"pairs-{i}.jsonl", i, max(args.pairs, 4))
            spec = job_spec(base, data, f"dpo-{i}", 0.05 + 0.05 * i, args)
            path = root / f"dpo-{i}.yaml"
            path.write_text(yaml.safe_dump(spec))
            (root / f"dpo-{i}.json").write_text(json.dumps(spec))
            paths.append(path)

        carpool = [str(Path(sys.executable).with_name("carpool")), "train", *map(str, paths)]
        fused_total, fused_first, _ = timed_lines([*carpool, "--out", str(root / "out")], "step 1/")
        trl_total, trl_first = 0.0, 0.0
        for i in range(args.jobs):
            total, first, _ = timed_lines(
                [sys.executable, __file__, "--trl-child", str(root / f"dpo-{i}.json")],
                "FIRST_STEP",
            )
            trl_total += total
            trl_first += first or total
        share, passes = reference_share(paths)

    fused_first = fused_first or fused_total
    print(
        f"K={args.jobs} DPO jobs, {args.steps} steps of {args.pairs} pairs each (tiny Llama, CPU)"
    )
    print(f"{'path':<30} {'total s':>8} {'to 1st step s':>14} {'after s':>8}")
    rows = [("carpool train (one process)", fused_total, fused_first),
            ("TRL DPOTrainer, one by one", trl_total, trl_first)]  # fmt: skip
    for label, total, first in rows:
        print(f"{label:<30} {total:>8.1f} {first:>14.1f} {total - first:>8.1f}")
    print(f"makespan: TRL one by one / carpool train = {trl_total / fused_total:.2f}x")
    print(
        f"shared reference pass: {share:.1%} of carpool's round time "
        f"({passes} base-only forward(s) per round for all {args.jobs} jobs)"
    )


if __name__ == "__main__":
    main()
