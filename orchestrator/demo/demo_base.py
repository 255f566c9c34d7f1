"""The demo's base model: a tiny Llama given a few skills by brief pretraining, then cached.

LoRA steers what a base model can already do. On a random-init base the
demo's jobs learned nothing in their few hundred steps (loss stayed near
ln(vocab); `reverse` answered "bird bird bird bird"). So the demo first trains
its tiny base, all parameters, for about a minute on generated rows that teach
four skills: copy a phrase, reverse it, shout it (upper case and " !"), wrap it
in a polite sentence. Every pretraining row starts with its skill's name, in a
plain layout (`reverse : the cat sat` then a newline) or in a chat turn. The
demo's rows never name one: `shout` and `reverse` see the bare phrase, `polite`
a chat turn holding only the phrase. What each LoRA job learns is which skill
its bare prompt asks for; its held-out prompts show whether it did.

The result is a plain `LlamaForCausalLM` saved with `save_pretrained`, which
the jobs load through `from_pretrained` like any hub model. It is built in a
temporary folder and renamed into place last, with `pretraining.json` naming
its recipe: an interrupted build is never reused, and a base made by another
recipe (or an older random-init demo base) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.base.unseen_packages import save_without_deepspeed
from carpool.workers.data.dataset import IGNORE_INDEX, tokenize_record
from transformers import AutoModelForCausalLM, AutoTokenizer

# Few enough that the tokenizer gives every word one token, in each case and
# with or without a leading space (see tests/orchestrator/demo/test_demo.py).
WORDS = [
    "the", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over",
    "a", "mat", "tree", "roof", "big", "small", "red", "blue", "happy", "quiet",
    "fast", "slow", "house", "garden", "river",
]  # fmt: skip

SKILLS: dict[str, Callable[[str], str]] = {
    "copy": lambda p: p,
    "reverse": lambda p: " ".join(p.split()[::-1]),
    "shout": lambda p: p.upper() + " !",
    "polite": lambda p: f"thank you for telling me that {p} .",
}
# Reversing takes a tiny model longest to learn: it gets twice the rows.
SKILL_MIX = ["copy", "reverse", "reverse", "shout", "polite"]
RECIPE_FILE = "pretraining.json"


def phrase(rng: random.Random) -> str:
    """3 to 5 distinct words: copying and reversing stay unambiguous for a tiny model."""
    return " ".join(rng.sample(WORDS, rng.randint(3, 5)))


@dataclass(frozen=True)
class Recipe:
    """Everything the saved base depends on; a cached base is reused only for an equal one."""

    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    version: int = 1  # bump when the rows or the loop change


def skill_record(skill: str, text: str, chat: bool) -> dict:
    """One pretraining row as a dataset record: the skill named, then the phrase."""
    answer = SKILLS[skill](text)
    if chat:
        user = {"role": "user", "content": f"{skill} :\n{text}"}
        return {"messages": [user, {"role": "assistant", "content": answer}]}
    return {"prompt": f"{skill} : {text}\n", "completion": answer}


def skill_row(skill: str, text: str, tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels), tokenized by the code that tokenizes the demo jobs' rows."""
    fmt = "messages" if chat else "prompt_completion"
    row, _ = tokenize_record(skill_record(skill, text, chat), fmt, tokenizer, max_seq_length=128)
    return list(row.input_ids), list(row.labels)


def skill_rows(
    rng: random.Random, tokenizer, count: int, avoid: frozenset[str]
) -> list[tuple[list[int], list[int]]]:
    """`count` rows, each a random skill on a fresh phrase in a random layout."""
    rows = []
    while len(rows) < count:
        text = phrase(rng)
        if text not in avoid:
            rows.append(skill_row(rng.choice(SKILL_MIX), text, tokenizer, rng.random() < 0.5))
    return rows


def corpus(count: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the tokenizer on: the words, skills and layouts of the rows."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        record = skill_record(rng.choice(list(SKILLS)), phrase(rng), chat=i % 2 == 1)
        if "messages" in record:  # near enough the chat template for the tokenizer's merges
            texts.append(
                "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in record["messages"])
            )
        else:
            texts.append(record["prompt"] + record["completion"])
    return texts


def pretrain(
    model: torch.nn.Module,
    tokenizer,
    recipe: Recipe,
    avoid: frozenset[str],
    log: Callable[[str], None],
) -> float:
    """Full-parameter training on fresh skill rows each step; returns the last loss."""
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(recipe.steps):
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate * warmup * cosine
        rows = skill_rows(rng, tokenizer, recipe.batch_size, avoid)
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"  pretraining step {step + 1}/{recipe.steps}  loss {loss.item():.4f}")
    model.eval()
    return loss.item()


def is_built(out: Path, recipe: Recipe, avoid: str) -> bool:
    """Whether `out` holds a finished base of this recipe that left out these phrases."""
    try:
        record = json.loads((out / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record.get("recipe") == asdict(recipe) and record.get("avoid") == avoid


def build_demo_base(
    out_dir: str | Path,
    *,
    avoid: Iterable[str] = (),
    recipe: Recipe | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The pretrained demo base at `out_dir`, built unless an equal recipe's is there.

    `avoid`: phrases pretraining never shows (the demo's own rows), so its
    held-out prompts are new to the base as well as to the adapters.
    """
    out = Path(out_dir)
    avoid = frozenset(avoid)
    recipe = recipe or Recipe()
    avoided = hashlib.sha256("\n".join(sorted(avoid)).encode()).hexdigest()[:16]
    if is_built(out, recipe, avoided):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a build that was killed
    log(f"pretraining the demo base once ({recipe.steps} steps; kept in {out})")
    started = time.perf_counter()
    try:
        build_tiny_base(
            partial,
            hidden_size=recipe.hidden_size,
            intermediate_size=recipe.intermediate_size,
            num_layers=recipe.num_layers,
            num_heads=recipe.num_heads,
            num_kv_heads=recipe.num_kv_heads,
            vocab_size=recipe.vocab_size,
            corpus=corpus(),
            seed=recipe.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(partial)
        model = AutoModelForCausalLM.from_pretrained(partial)
        loss = pretrain(model, tokenizer, recipe, avoid, log)
        save_without_deepspeed(model, partial)
        seconds = time.perf_counter() - started
        record = {
            "recipe": asdict(recipe),
            "avoid": avoided,  # a digest of the phrases left out
            "final_loss": loss,
            "seconds": round(seconds, 1),
        }
        (partial / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # another recipe's base, or a random-init one
        partial.rename(out)  # last: `out` only ever holds a finished base
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"pretrained in {seconds:.0f}s, final loss {loss:.4f}")
    return out
