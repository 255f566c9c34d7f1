"""Finished adapters of each kind the engine trains, saved by PEFT itself."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedDataset
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM

# Each kind the engine trains; random B (init_lora_weights=False) so each adapter changes the base.
KINDS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "rslora": LoraConfig(
        r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear", init_lora_weights=False
    ),
    "dora": LoraConfig(r=2, target_modules=["o_proj", "down_proj"], use_dora=True, init_lora_weights=False),
    "vera": VeraConfig(r=16, target_modules=["q_proj", "k_proj"], init_weights=False),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["v_proj", "up_proj"]),
}  # fmt: skip


def float32_base(tiny_base: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


def adapters_of_each_kind(tiny_base: Path, root: Path) -> dict[str, Path]:
    """{kind: adapter dir}: LoRA, rsLoRA on all linears, DoRA, VeRA and AdaLoRA, none a
    no-op."""
    out = {}
    for seed, (name, config) in enumerate(KINDS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(float32_base(tiny_base), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "vera_lambda" in n:  # VeRA's random vectors are small: make its term matter
                    p.mul_(4.0)
                if "lora_E" in n:  # AdaLoRA's singular values start at zero
                    p.normal_(0.0, 1.0)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def reference_eval_loss(model: torch.nn.Module, data: TokenizedDataset) -> tuple[float, int]:
    """(mean cross-entropy over trainable tokens, their count): `model` alone, row by row."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data.rows:
            logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1]
            labels = torch.tensor(row.labels[1:])
            keep = labels != IGNORE_INDEX
            total += float(F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def peft_greedy(
    tiny_base: Path, adapter: Path | None, prompt: list[int], max_new: int, eos: int
) -> tuple[list[int], float]:
    """PEFT's greedy `generate` of the adapter alone (None: the bare base) on a float32
    base: its tokens before EOS, and the smallest top-2 logit gap on the way (a guard
    against near-ties deciding a comparison)."""
    base = float32_base(tiny_base)
    model = base if adapter is None else PeftModel.from_pretrained(base, adapter).eval()
    out = model.generate(
        input_ids=torch.tensor([list(prompt)]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    gap = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokens, gap
