"""A 16-trial sweep through carpool (trials riding together, losers pruned) against the
same 16 trials each run to completion alone with PEFT, one after another.

Both sides train the same trials on the same tiny local base and data (rows in file
order), evaluate every `--eval-steps` steps, and pick the trial with the lowest eval loss.

  carpool  the controller's loop (the one `carpool up` runs in its actor) ticking over an
           in-process worker group (`orchestrator/control/local_group.py`: no Ray start-up timed),
           the sweep submitted as `carpool sweep submit` does: grid sampler, successive
           halving, `--concurrent` trials at a time in one fused group.
  PEFT     per trial: `get_peft_model` on the loaded base, `torch.optim.AdamW`, a plain
           loop to `--steps`, the same evals; the base is loaded once for all trials.

Prints both makespans, their ratio, and each side's best trial.

Also times the same sweep with no pruner, to split the gain into fusing and pruning.

    python benchmarks/sweep.py [--steps 80] [--eval-steps 5] [--concurrent 16]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import yaml
from carpool.orchestrator.control.controller import Controller
from carpool.orchestrator.control.local_group import LocalGroupFactory
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.store.job_queue import JobQueue
from carpool.orchestrator.sweeps.sweep_spec import load_sweep_file, trial_spec
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedRow, load_dataset
from carpool.workers.spec.job_spec import JobSpec
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "one", "two", "three",
         "cat", "dog", "sun", "moon", "up", "down"]  # fmt: skip


def _phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + k * 7) % len(WORDS)] for k in range(n))


def build(root: Path, args: argparse.Namespace) -> Path:
    """Base, data, template and sweep file under `root`; returns the sweep file."""
    corpus = [_phrase(i, 12) for i in range(300)]
    base = build_tiny_base(root / "base", hidden_size=args.hidden, num_layers=args.layers,
                           intermediate_size=args.hidden * 2, corpus=corpus)  # fmt: skip

    def rows(start: int, count: int) -> str:
        # A task to learn: the completion is the prompt's words in reverse order.
        out = []
        for i in range(start, start + count):
            prompt = _phrase(i, 3 + i % 6)
            out.append({"prompt": prompt, "completion": " " + " ".join(reversed(prompt.split()))})
        return "".join(json.dumps(r) + "\n" for r in out)

    (root / "train.jsonl").write_text(rows(0, 400))
    (root / "eval.jsonl").write_text(rows(1000, 32))
    template = {
        "name": "t",
        "base_model": str(base),
        "dataset": {"path": str(root / "train.jsonl")},
        "eval_dataset": {"path": str(root / "eval.jsonl")},
        "adapter": {"r": 8, "lora_alpha": 16},
        "training": {"max_steps": args.steps, "eval_steps": args.eval_steps, "batch_size": 4,
                     "max_seq_length": 64, "shuffle": False, "save_steps": 10_000},
    }  # fmt: skip
    (root / "template.yaml").write_text(yaml.safe_dump(template))
    sweep = {
        "name": "bench",
        "template": "template.yaml",
        "parameters": {
            "training.learning_rate": {"choices": [1.0e-5, 1.0e-4, 1.0e-3, 3.0e-3]},
            "adapter.r": {"choices": [4, 8]},
            "adapter.target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]},
        },
        "trials": 16,
        "sampler": "grid",
        "seed": 0,
        "pruner": "successive_halving",
        "pruner_options": {"min_resource": args.eval_steps, "reduction_factor": 3},
        "max_concurrent": args.concurrent,
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    # The same trials without pruning: what fusing them alone gives.
    unpruned = {**sweep, "name": "bench-all", "pruner": "none", "pruner_options": {}}
    (root / "sweep-unpruned.yaml").write_text(yaml.safe_dump(unpruned))
    return root / "sweep.yaml"


def run_carpool(sweep_file: Path, state: Path) -> tuple[float, dict[int, float], list[int]]:
    """The sweep on the controller loop: (seconds, best eval loss by trial, pruned trials)."""
    loaded = load_sweep_file(sweep_file)
    name = loaded.spec.name
    queue = JobQueue(state / "queue.sqlite")
    controller = Controller(
        queue,
        OperatorConfig.model_validate({"max_adapters_per_group": 16}),
        LocalGroupFactory(state / "groups"),
        free_group_slots=lambda running: 1 - running,
        checkpoints=_NoCheckpoints(),
    )
    start = time.perf_counter()
    controller.submit_sweep(loaded.spec.model_dump(mode="json"), loaded.template, str(sweep_file))
    while queue.sweep(name).state == "running":
        controller.tick()
    seconds = time.perf_counter() - start
    trials = queue.trials(name)
    best = {t.number: t.best for t in trials if t.job.state.value == "succeeded"}
    pruned = [t.number for t in trials if t.job.state.value == "pruned"]
    queue.close()
    return seconds, best, pruned


class _NoCheckpoints:
    def delete_checkpoints(self, job_id: str) -> None:
        pass


def _batch(rows: list[TokenizedRow], pad: int) -> dict[str, torch.Tensor]:
    seq = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), seq), pad)
    labels = torch.full((len(rows), seq), IGNORE_INDEX)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        mask[i, : len(r.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def peft_trial(base, spec: JobSpec, train, evals, pad: int) -> float:
    """One trial alone: PEFT + AdamW to the end; its best eval loss."""
    a, t = spec.adapter, spec.training
    torch.manual_seed(t.seed)
    lora = LoraConfig(r=a.r, lora_alpha=a.lora_alpha, target_modules=a.target_modules,
                      lora_dropout=0.0)  # fmt: skip
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    best = math.inf
    for step in range(1, t.max_steps + 1):
        first = (step - 1) * t.batch_size
        rows = [train.rows[(first + k) % len(train.rows)] for k in range(t.batch_size)]
        model(**_batch(rows, pad)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % t.eval_steps == 0 or step == t.max_steps:
            best = min(best, _eval_loss(model, evals, pad))
    model.unload()  # the base back as it was, for the next trial
    return best


@torch.no_grad()
def _eval_loss(model, evals, pad: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(evals.rows), 16):
        batch = _batch(list(evals.rows[i : i + 16]), pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum"))  # fmt: skip
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def run_peft(sweep_file: Path, numbers: list[int], params: dict[int, dict]) -> tuple[float, dict]:
    loaded = load_sweep_file(sweep_file)
    template = JobSpec.model_validate(loaded.template)
    tok = load_tokenizer(template.base_model)
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(template.base_model, dtype=torch.float32)
    base.requires_grad_(False)
    train = load_dataset(Path(template.dataset.path), "auto", tok, 64)
    evals = load_dataset(Path(template.eval_dataset.path), "auto", tok, 64)
    best = {}
    for n in numbers:
        spec = JobSpec.model_validate(trial_spec(loaded, n, params[n]))
        best[n] = peft_trial(base, spec, train, evals, tok.pad_token_id)
    return time.perf_counter() - start, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=16, help="the sweep's max_concurrent")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep_file = build(root, args)
        ours, best_ours, pruned = run_carpool(sweep_file, root / "state")
        with JobQueue(root / "state" / "queue.sqlite") as queue:
            params = {t.number: t.params for t in queue.trials("bench")}
        unpruned, _, _ = run_carpool(root / "sweep-unpruned.yaml", root / "state-unpruned")
        theirs, best_theirs = run_peft(sweep_file, sorted(params), params)
    winner_ours = min(best_ours, key=best_ours.get)
    winner_theirs = min(best_theirs, key=best_theirs.get)
    print(f"16 trials, {args.steps} steps each, eval every {args.eval_steps}; "
          f"hidden {args.hidden}, {args.layers} layers; max_concurrent {args.concurrent}")  # fmt: skip
    print(f"  carpool sweep (fused, pruned)  {ours:8.1f} s   {len(pruned)} trials pruned")
    print(f"  carpool, fused, none pruned    {unpruned:8.1f} s")
    print(f"  PEFT, one trial after another  {theirs:8.1f} s")
    print(
        f"makespan: PEFT one by one / carpool sweep = {theirs / ours:.2f}x "
        f"(fusing alone: {theirs / unpruned:.2f}x; pruning: {unpruned / ours:.2f}x more)"
    )
    print(f"best trial: carpool t{winner_ours:02d} {params[winner_ours]} "
          f"(eval {best_ours[winner_ours]:.4f}); PEFT t{winner_theirs:02d} "
          f"(eval {best_theirs[winner_theirs]:.4f}); same: {winner_ours == winner_theirs}")  # fmt: skip


if __name__ == "__main__":
    main()
