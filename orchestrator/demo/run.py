"""`make demo`: three visibly different LoRA jobs carpooling on one tiny base.

Builds (if absent) a tiny Llama-shaped base, pretrained once (a minute or
two on two CPU cores; see `orchestrator/demo/demo_base.py`), three small datasets
with held-out rows and their job specs under `demo_out/`, then runs the real
control plane: `carpool up` (a local Ray head and the controller; state in
`demo_out/state`), `carpool submit` of the three jobs, live progress
(`carpool status --watch`), `carpool fetch` of each adapter, `carpool plot`
of the jobs' loss curves to `demo_out/curves.png`, greedy answers to the
held-out prompts from each adapter (loaded through PEFT) beside the
expected ones, `carpool serve` and one held-out prompt asked of a served
adapter over HTTP, and `carpool down`.
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
from carpool.orchestrator.demo.demo_base import SKILLS, Recipe, build_demo_base, phrase
from carpool.workers.data.dataset import read_records

PROMPT_TEMPLATE = "{phrase}\n"


def phrases(count: int, seed: int) -> list[str]:
    """`count` different phrases (3 to 5 distinct words each)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        out[phrase(rng)] = None
    return list(out)


@dataclass(frozen=True)
class TaskData:
    train: Path
    eval: Path  # held-out phrases: the eval loss shows whether a job generalizes


def write_datasets(data_dir: Path, eval_rows: int = 24, rows: int = 600) -> dict[str, TaskData]:
    """Three tasks on the same phrases: shout it, reverse it, answer it politely.

    They are skills of the demo base, asked for without their names (see `demo_base`).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    items = phrases(rows, seed=0)
    shout = [
        {"prompt": PROMPT_TEMPLATE.format(phrase=p), "completion": SKILLS["shout"](p)}
        for p in items
    ]
    reverse = [
        {"prompt": PROMPT_TEMPLATE.format(phrase=p), "completion": SKILLS["reverse"](p)}
        for p in items
    ]
    polite = [
        {
            "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": SKILLS["polite"](p)},
            ]
        }
        for p in items
    ]
    paths = {}
    for name, records in [("shout", shout), ("reverse", reverse), ("polite", polite)]:
        task = TaskData(data_dir / f"{name}.jsonl", data_dir / f"{name}-eval.jsonl")
        task.train.write_text("".join(json.dumps(r) + "\n" for r in records[:-eval_rows]))
        task.eval.write_text("".join(json.dumps(r) + "\n" for r in records[-eval_rows:]))
        paths[name] = task
    return paths


def write_specs(root: Path, base: Path, data: dict[str, TaskData]) -> list[Path]:
    """One YAML job spec per task; they differ in rank, targets and learning rate."""
    adapters = {  # (adapter, learning rate), all different: jobs with their own settings
        "shout": ({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, 3.0e-3),
        "reverse": ({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}, 1.0e-2),
        "polite": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 2.0e-2),
    }  # fmt: skip
    specs = []
    for name, (adapter, learning_rate) in adapters.items():
        spec = {
            "name": f"demo-{name}",
            "base_model": str(base.resolve()),
            "dataset": {"path": str(data[name].train.resolve()), "format": "auto"},
            "eval_dataset": {"path": str(data[name].eval.resolve()), "format": "auto"},
            "adapter": adapter,
            "training": {
                "max_steps": 300,
                "batch_size": 16,
                "learning_rate": learning_rate,
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


def prepare(root: Path, recipe: Recipe | None = None) -> list[Path]:
    """Base (pretrained once, then reused), datasets and specs under `root`; returns the specs."""
    data = write_datasets(root / "data")
    # The base never sees the demo's phrases: its held-out prompts are new to base and adapter.
    seen = {phrase_and_answer(r)[0] for t in data.values() for r in read_records(t.train)}
    held_out = {phrase_and_answer(r)[0] for t in data.values() for r in read_records(t.eval)}
    base = build_demo_base(root / "models" / "tiny-llama", avoid=seen | held_out, recipe=recipe)
    return write_specs(root, base, data)


def phrase_and_answer(record: dict) -> tuple[str, str]:
    """A demo row's input phrase and the answer it teaches."""
    if "messages" in record:
        return record["messages"][0]["content"], record["messages"][-1]["content"]
    return record["prompt"].strip(), record["completion"]


def prompt_ids(record: dict, tokenizer) -> list[int]:
    """The ids a model continues for a row, tokenized as `workers.dataset` does in training:
    a plain prompt with BOS, a chat render up to the assistant's turn without."""
    if "messages" in record:
        turns = record["messages"][:-1]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(record["prompt"])["input_ids"]


def generate(
    base: str, adapter: Path | None, records: list[dict], max_new_tokens: int = 32
) -> list[str]:
    """Greedy completions of the rows' prompts by the base under a PEFT adapter (None: bare base)."""
    import torch
    from carpool.workers.base.unseen_packages import peft_without_bitsandbytes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with peft_without_bitsandbytes():
        from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    prompts = [prompt_ids(r, tokenizer) for r in records]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    # One batch, padded on the left so every row's next token comes at the same place.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
    return [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def show_held_out(
    base: str, specs: list[Path], adapters: dict[str, Path], examples: int = 3
) -> dict[str, tuple[int, int]]:
    """Print each adapter's greedy answers to its job's held-out rows, a few in full beside
    the expected answer and the bare base's, then how many of all were exactly right.

    Returns {job: (right, rows)}.
    """
    rows = {
        spec.stem: read_records(Path(yaml.safe_load(spec.read_text())["eval_dataset"]["path"]))
        for spec in specs
    }
    answers = {job: generate(base, adapters[job], records) for job, records in rows.items()}
    right = {
        job: [a == phrase_and_answer(r)[1] for a, r in zip(answers[job], rows[job], strict=True)]
        for job in rows
    }
    # The tasks share their phrases row for row; the bare base gets the plain prompt.
    plain = next(job for job, records in rows.items() if "prompt" in records[0])
    bare = generate(base, None, rows[plain][:examples], max_new_tokens=12)
    print("\nHeld-out prompts (in no job's training data, nor in the base's pretraining):")
    for i, text in enumerate(bare):
        print(f"  {phrase_and_answer(rows[plain][i])[0]!r}")
        print(f"    {'no adapter':<10} -> {text} ...")
        for job, records in rows.items():
            verdict = "✓" if right[job][i] else f"✗  expected: {phrase_and_answer(records[i])[1]}"
            print(f"    {job:<10} -> {answers[job][i]}   {verdict}")
    scores = {job: (sum(ok), len(ok)) for job, ok in right.items()}
    print(
        "Exactly right on held-out prompts: "
        + ", ".join(f"{job} {n}/{total}" for job, (n, total) in scores.items())
    )
    return scores


def ask_served(state_dir: Path, spec: Path, max_tokens: int = 32) -> str:
    """Ask `carpool serve`'s endpoint, over HTTP with its key, the job's first held-out
    prompt by the job's name; prints the request as curl would send it and the answer."""
    import urllib.request

    serving = json.loads((state_dir / "serve" / "serving.json").read_text())
    key = Path(serving["key_file"]).read_text().strip()
    job = yaml.safe_load(spec.read_text())
    record = read_records(Path(job["eval_dataset"]["path"]))[0]
    chat = "messages" in record
    body = {"model": job["name"], "max_tokens": max_tokens, "temperature": 0}
    if chat:
        body["messages"] = record["messages"][:-1]
    else:
        body["prompt"] = record["prompt"]
    url = f"{serving['url']}/{'chat/completions' if chat else 'completions'}"
    print(f"\n$ curl {url} -H 'Authorization: Bearer $(cat {serving['key_file']})' \\")
    print(f"    -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.loads(response.read())["choices"][0]
    answer = (choice["message"]["content"] if chat else choice["text"]).strip()
    expected = phrase_and_answer(record)[1]
    verdict = "✓" if answer == expected else f"✗  expected: {expected}"
    print(f"  {job['name']} over HTTP -> {answer}   {verdict}")
    return answer


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
    from carpool.orchestrator.cli.main import main as carpool
    from carpool.orchestrator.runtime.client import CLUSTER_FILE, Client

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
        # A free port for `carpool serve`'s endpoint (8000 may be taken on this machine).
        from carpool.orchestrator.runtime.local_ray import free_port

        operator = root / "operator.yaml"
        operator.parent.mkdir(parents=True, exist_ok=True)
        operator.write_text(yaml.safe_dump({"serve": {"port": free_port()}}))
        run("up", "--config", str(operator.relative_to(Path.cwd())))
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
        run("plot", *job_ids, "--out", str(root / "curves.png"))  # prints the image's path
        base = yaml.safe_load(specs[0].read_text())["base_model"]
        show_held_out(base, specs, dirs)
        # The same adapters, served: an OpenAI-compatible endpoint on the running carpool.
        run("serve")
        ask_served(Path(os.environ["CARPOOL_STATE_DIR"]), specs[0])
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
