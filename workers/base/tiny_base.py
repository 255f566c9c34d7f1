"""Build a tiny base model (Llama-shaped, or of another family) and its tokenizer on local disk.

No hub is reachable from tests, benchmarks or the demo, so they make a small
random-init model and a BPE tokenizer trained on local text, save both with
`save_pretrained`, and then load them through the same
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` path a hub id takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from carpool.workers.base.unseen_packages import save_without_deepspeed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# A plain chat template: every turn is "<|role|>\n{content}</s>\n". The
# generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A support agent answers questions about billing, refunds and accounts.",
    "Translate the sentence into French: the cat sits on the mat.",
    "Summarize: carpool trains many small adapters on one frozen base model.",
    "Question: what is two plus three? Answer: five.",
    "user assistant system: hello, how can I help you today?",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" < > | _",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "olmo2", "gpt2")


def family_config(
    family: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """A config dict (with `model_type`) of `family`'s shape at the given sizes.

    head_dim is set where a family's default is a fixed number (Qwen3, Gemma-2:
    128, 256) rather than hidden_size / num_heads.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    head_dim = hidden_size // num_heads
    if family == "gpt2":  # GPT-2 names its sizes its own way and has no grouped KV heads
        return dict(
            model_type="gpt2",
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
        )
    config: dict[str, Any] = dict(
        model_type=family,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    if family in ("qwen3", "gemma2", "mistral"):
        config["head_dim"] = head_dim
    if family == "gemma2":
        config["query_pre_attn_scalar"] = head_dim
    if family == "mistral":
        config["sliding_window"] = None  # as Mistral-7B-v0.3; a window keeps rows padded
    return config


def build_tiny_base(
    out_dir: str | Path,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-init model of `family` (see FAMILIES) and a trained tokenizer to `out_dir`.

    Every family gets the byte-level BPE tokenizer: for Qwen2 or GPT-2 bases
    `AutoTokenizer` picks the family's own BPE class and rebuilds it from
    tokenizer.json, which only a byte-level BPE survives intact.
    Returns `out_dir`. Does nothing if a model is already saved there.
    """
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    text = list(corpus) if corpus is not None else []
    tokenizer = train_tokenizer(_DEFAULT_CORPUS + text, vocab_size=vocab_size)
    shape = family_config(
        family,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    config = AutoConfig.for_model(
        **shape,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    save_without_deepspeed(model, out)
    tokenizer.save_pretrained(out)
    return out
