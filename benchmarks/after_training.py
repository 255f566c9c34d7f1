"""Eval and generation over K finished adapters: carpool fused vs PEFT, side by side.

One random-init Llama-shaped base (hidden 256, 4 layers by default), K LoRA
adapters of mixed ranks and targets (PEFT-saved, random B so each changes the
base), one eval dataset and a prompt list. Timed in one process, alternating,
best of `--repeats`:

  eval      carpool: `FusedAdapters.evaluate` (every adapter's rows in shared
            micro-batches); PEFT: one PeftModel holding all K adapters,
            `set_adapter` then the same rows in batches, adapter after adapter.
  generate  greedy, `--new-tokens` each. carpool: every (prompt, adapter) in
            mixed batches of `--batch-rows`; PEFT one adapter at a time
            (`set_adapter`, that adapter's prompts batched, left-padded); and
            PEFT's own mixed batches (`generate(adapter_names=...)`).

Prints each time and the ratios (PEFT / carpool: above 1 means carpool is faster).

    python benchmarks/after_training.py [--adapters 8] [--rows 64] [--prompts 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from carpool.workers.after_training.fused_inference import (
    FusedAdapters,
    GenerationRequest,
    Sampling,
)
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.data.dataset import load_dataset, prompt_ids
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = (["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"], ["gate_proj", "up_proj"])


def words(i: int, n: int) -> str:
    vocab = [
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
        "over",
        "lazy",
        "dog",
    ]
    return " ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(n))


def build_adapters(
    root: Path, adapters: int, hidden: int, layers: int
) -> tuple[Path, dict[str, Path]]:
    """The random-init base and `adapters` PEFT-saved LoRA adapters of mixed ranks and
    targets (random B, so each changes the base); benchmarks/serve.py uses them too."""
    base = build_tiny_base(
        root / "base",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=hidden * 2,
        vocab_size=2048,
        corpus=[words(i, 12) for i in range(400)],
    )
    saved = {}
    for k in range(adapters):
        torch.manual_seed(k)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=(4, 8, 16)[k % 3], target_modules=TARGETS[k % 4], init_lora_weights=False),
        )
        model.save_pretrained(root / f"a{k}")
        saved[f"a{k}"] = root / f"a{k}"
    return base, saved


def build(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Path], Path, list[str]]:
    import json

    base, adapters = build_adapters(root, args.adapters, args.hidden, args.layers)
    data = root / "eval.jsonl"
    rows = [{"prompt": words(i, 8 + i % 24), "completion": words(i + 3, 4 + i % 40)}
            for i in range(args.rows)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [words(i * 3, 4 + i % 20) for i in range(args.prompts)]
    return base, adapters, data, prompts


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def peft_eval(model, names: list[str], dataset, batch_rows: int, pad: int) -> dict[str, float]:
    """Each adapter's mean loss over the trainable tokens, one adapter after another."""
    out = {}
    for name in names:
        model.set_adapter(name)
        total, count = 0.0, 0
        for rows in _batches(list(dataset.rows), batch_rows):
            seq = max(len(r.input_ids) for r in rows)
            ids = torch.full((len(rows), seq), pad)
            labels = torch.full((len(rows), seq), -100)
            mask = torch.zeros((len(rows), seq), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
                labels[i, : len(r.labels)] = torch.tensor(r.labels)
                mask[i, : len(r.input_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
                )
            )
            count += int((target != -100).sum())
        out[name] = total / count
    return out


def _left_padded(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    seq = max(map(len, prompts))
    ids = torch.full((len(prompts), seq), pad)
    mask = torch.zeros((len(prompts), seq), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, seq - len(p) :] = torch.tensor(p)
        mask[i, seq - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def peft_generate(model, names, prompts, args, tok, mixed: bool) -> None:
    options = {"max_new_tokens": args.new_tokens, "do_sample": False,
               "min_new_tokens": args.new_tokens, "pad_token_id": tok.pad_token_id}  # fmt: skip
    if mixed:  # PEFT's own mixed-adapter batches
        pairs = [(n, p) for p in prompts for n in names]
        for chunk in _batches(pairs, args.batch_rows):
            inputs = _left_padded([p for _, p in chunk], tok.pad_token_id)
            model.generate(**inputs, adapter_names=[n for n, _ in chunk], **options)
        return
    for name in names:
        model.set_adapter(name)
        for chunk in _batches(prompts, args.batch_rows):
            model.generate(**_left_padded(chunk, tok.pad_token_id), **options)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters, data, prompt_texts = build(Path(tmp), args)
        tok = load_tokenizer(str(base))
        names = list(adapters)
        dataset = load_dataset(data, "auto", tok, 512)
        prompts = [prompt_ids({"prompt": p}, tok) for p in prompt_texts]
        fused = FusedAdapters(str(base), adapters, device="cpu", micro_batch_tokens=8192)
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base), adapters["a0"], "a0"
        )
        for name in names[1:]:
            peft.load_adapter(adapters[name], name)
        peft.eval()
        requests = [
            GenerationRequest(n, tuple(p), str(i)) for i, p in enumerate(prompts) for n in names
        ]
        # The eval losses agree before anything is timed.
        ours = {r.name: r.loss for r in fused.evaluate(dataset)}
        theirs = peft_eval(peft, names, dataset, args.batch_rows, tok.pad_token_id)
        worst = max(abs(ours[n] - theirs[n]) / theirs[n] for n in names)
        sampling = Sampling(max_new_tokens=args.new_tokens)
        eos = tok.eos_token_id
        tok.eos_token_id = None  # both sides decode every new token (no early stop)
        fused.tokenizer.eos_token_id = None
        fused.base.generation_config.eos_token_id = None
        peft.generation_config.eos_token_id = None
        times: dict[str, list[float]] = {k: [] for k in ("eval carpool", "eval peft",
                                          "gen carpool", "gen peft", "gen peft mixed")}  # fmt: skip
        for _ in range(args.repeats):
            times["eval carpool"].append(timed(lambda: fused.evaluate(dataset)))
            times["eval peft"].append(
                timed(lambda: peft_eval(peft, names, dataset, args.batch_rows, tok.pad_token_id))
            )
            times["gen carpool"].append(
                timed(lambda: fused.generate(requests, sampling, batch_rows=args.batch_rows))
            )
            times["gen peft"].append(
                timed(lambda: peft_generate(peft, names, prompts, args, tok, False))
            )
            times["gen peft mixed"].append(
                timed(lambda: peft_generate(peft, names, prompts, args, tok, True))
            )
        tok.eos_token_id = eos
    best = {k: min(v) for k, v in times.items()}
    print(f"K={args.adapters} adapters, {args.rows} eval rows, {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, hidden {args.hidden}, {args.layers} layers, "
          f"best of {args.repeats}; eval losses agree to {worst:.1e} relative")  # fmt: skip
    for k, v in best.items():
        print(f"  {k:<16} {v:8.3f} s")
    print(f"eval:     PEFT one adapter at a time / carpool fused = "
          f"{best['eval peft'] / best['eval carpool']:.2f}x")  # fmt: skip
    print(f"generate: PEFT one adapter at a time / carpool fused = "
          f"{best['gen peft'] / best['gen carpool']:.2f}x")  # fmt: skip
    print(f"generate: PEFT mixed batches (adapter_names) / carpool fused = "
          f"{best['gen peft mixed'] / best['gen carpool']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
