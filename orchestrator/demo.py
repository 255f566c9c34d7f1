"""`make demo`: three visibly different LoRA jobs carpooling on one tiny base.

Builds (if absent) a tiny Llama-shaped base, three small datasets and their
job specs under `demo_out/`, then runs the real control plane: `carpool up`
(a local Ray head and the controller; state in `demo_out/state`), `carpool
submit` of the three jobs, live progress (`carpool status --watch`), `carpool
fetch` of each adapter, one generation per adapter from the same prompt
(loaded through PEFT), and `carpool down`.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

WORDS = [
    "the",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "a",
    "mat",
    "tree",
    "roof",
    "big",
    "small",
    "red",
    "blue",
    "happy",
    "quiet",
    "fast",
    "slow",
    "house",
    "garden",
    "river",
]
PROMPT_TEMPLATE = "{phrase}\n"


def phrases(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(count)]


@dataclass(frozen=True)
class TaskData:
    train: Path
    eval: Path  # held-out phrases: the eval loss shows whether a job generalizes


def write_datasets(data_dir: Path, eval_rows: int = 24) -> dict[str, TaskData]:
    """Three tasks on the same kind of input: shout it, reverse it, answer it politely."""
    data_dir.mkdir(parents=True, exist_ok=True)
    items = phrases(240, seed=0)
    shout = [
        {"prompt": PROMPT_TEMPLATE.format(phrase=p), "completion": p.upper() + " !"} for p in items
    ]
    reverse = [
        {"prompt": PROMPT_TEMPLATE.format(phrase=p), "completion": " ".join(p.split()[::-1])}
        for p in items
    ]
    polite = [
        {
            "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": f"thank you for telling me that {p} ."},
            ]
        }
        for p in items
    ]
    paths = {}
    for name, rows in [("shout", shout), ("reverse", reverse), ("polite", polite)]:
        task = TaskData(data_dir / f"{name}.jsonl", data_dir / f"{name}-eval.jsonl")
        task.train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-eval_rows]))
        task.eval.write_text("".join(json.dumps(r) + "\n" for r in rows[-eval_rows:]))
        paths[name] = task
    return paths


def write_specs(root: Path, base: Path, data: dict[str, TaskData]) -> list[Path]:
    """One YAML job spec per task; they differ in rank, targets and learning rate."""
    adapters = {
        "shout": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "reverse": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
        "polite": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    }  # fmt: skip
    specs = []
    for name, adapter in adapters.items():
        spec = {
            "name": f"demo-{name}",
            "base_model": str(base.resolve()),
            "dataset": {"path": str(data[name].train.resolve()), "format": "auto"},
            "eval_dataset": {"path": str(data[name].eval.resolve()), "format": "auto"},
            "adapter": adapter,
            "training": {
                "max_steps": 300,
                "batch_size": 16,
                "learning_rate": 5.0e-3,
                "lr_scheduler_type": "cosine",
                "warmup_steps": 10,
                "max_seq_length": 64,
                "seed": 0,
                "save_steps": 40,
                "eval_steps": 100,
            },
        }
        path = root / "jobs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        specs.append(path)
    return specs


def prepare(root: Path) -> list[Path]:
    """Base, datasets and specs under `root`; returns the spec files."""
    from carpool.workers.tiny_base import build_tiny_base

    data = write_datasets(root / "data")
    corpus = [line for task in data.values() for line in task.train.read_text().splitlines()]
    base = build_tiny_base(
        root / "models" / "tiny-llama",
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        vocab_size=600,
        corpus=corpus,
    )
    return write_specs(root, base, data)


def generate(base: str, adapter_dirs: dict[str, Path], prompt: str) -> dict[str, str]:
    """Greedy completion of `prompt` by the base under each exported adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    out = {}
    for name, path in adapter_dirs.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).eval()
        text = prompt
        if "polite" in name:
            messages = [{"role": "user", "content": prompt.strip()}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        out[name] = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return out


class DemoStepFailed(Exception):
    def __init__(self, argv: tuple[str, ...], status: int) -> None:
        super().__init__(argv, status)
        self.argv, self.status = argv, status

    def __str__(self) -> str:
        return (
            f"`carpool {' '.join(self.argv)}` exited with status {self.status} (its error is above)"
        )


def main() -> int:
    import os
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = Path("demo_out").resolve()
    from carpool.orchestrator.cli import main as carpool
    from carpool.orchestrator.client import CLUSTER_FILE, Client

    if "CARPOOL_STATE_DIR" not in os.environ:
        # The demo's own queue: emptied first, so its status shows this run's jobs only.
        state = root / "state"
        os.environ["CARPOOL_STATE_DIR"] = str(state)
        if (state / CLUSTER_FILE).exists():  # a demo cut short left its carpool up
            with contextlib.suppress(Exception):
                Client(state).down()
        shutil.rmtree(state, ignore_errors=True)
    specs = prepare(root)

    def run(*argv: str, capture: bool = False) -> str:
        """One `carpool` command, echoed; its stdout is returned when `capture`."""
        print(f"\n$ carpool {' '.join(argv)}", flush=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
            status = carpool(list(argv))
        print(out.getvalue(), end="")
        if status != 0:  # the command has printed its own error to stderr
            raise DemoStepFailed(argv, status)
        return out.getvalue()

    up = False
    try:
        run("up")
        up = True
        paths = [
            str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
            for p in specs
        ]
        job_ids = run("submit", *paths, capture=True).split()
        run("status", "--watch")
        run("wait", *job_ids)
        run("status")  # final loss and eval loss per job
        out = root / "adapters"
        dirs = {}
        for spec, job_id in zip(specs, job_ids, strict=True):
            dirs[spec.stem] = out / spec.stem
            run("fetch", job_id, "--out", str(dirs[spec.stem]))
        base = yaml.safe_load(specs[0].read_text())["base_model"]
        prompt = PROMPT_TEMPLATE.format(phrase="the happy dog ran over the river")
        print(f"\nprompt: {prompt.strip()!r}")
        for name, text in generate(base, dirs, prompt).items():
            print(f"  {name:<8} -> {text}")
        up = False
        run("down")
    except DemoStepFailed as failed:
        print(f"\ndemo stopped: {failed}", file=sys.stderr)
        return 1
    finally:
        if up:  # stopped early: take down what the demo started, quietly
            with contextlib.suppress(Exception):
                Client().down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
