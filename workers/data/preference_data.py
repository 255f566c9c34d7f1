"""Preference records (`{"prompt", "chosen", "rejected"}`) as pairs of labelled rows.

Tokenized as TRL's DPOTrainer tokenizes them, so a pair's log-probabilities are the ones
TRL computes: the prompt alone and the prompt followed by each completion are tokenized
(plain text: the tokenizer's own special tokens, an EOS appended to a completion that lacks
one; conversational: the chat template, the prompt with its generation prompt), and the
completion starts where the tokenized prompt and prompt + completion stop agreeing. Only a
completion's tokens are trained (they alone count in its log-probability); the prompt's
are context. A row longer than `max_seq_length` keeps its start; a record whose prompt
alone fills `max_seq_length` leaves no completion token and is dropped, as TRL drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.workers.data.dataset_rows import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.record_fields import chat_messages, field

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One record of a preference dataset: its two rows share the prompt."""

    chosen: TokenizedRow
    rejected: TokenizedRow

    @property
    def rows(self) -> tuple[TokenizedRow, TokenizedRow]:
        return (self.chosen, self.rejected)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(encoded["input_ids"])


def _sequences(record: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """The tokenized prompt, prompt + chosen and prompt + rejected, TRL's way."""
    if isinstance(record.get("prompt"), list):  # conversational
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "conversational preference data needs a tokenizer with a chat template"
            )
        prompt = chat_messages(record, "prompt")
        chosen, rejected = chat_messages(record, "chosen"), chat_messages(record, "rejected")
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same: the pair prefers nothing")
        return (
            template_ids(tokenizer, prompt, generation_prompt=True),
            template_ids(tokenizer, prompt + chosen),
            template_ids(tokenizer, prompt + rejected),
        )
    prompt = field(record, "prompt", str)
    chosen = field(record, "chosen", str, non_empty=True)
    rejected = field(record, "rejected", str, non_empty=True)
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same: the pair prefers nothing")
    return text_ids(tokenizer, prompt), *(
        text_ids(tokenizer, prompt + with_eos(tokenizer, c)) for c in (chosen, rejected)
    )


def text_ids(tokenizer, text: str) -> list[int]:
    """Plain text tokenized as TRL's trainers do (the tokenizer's own special tokens)."""
    return list(tokenizer(text=text)["input_ids"])


def with_eos(tokenizer, completion: str) -> str:
    """A plain-text completion with the EOS TRL appends where it lacks one."""
    eos = tokenizer.eos_token or ""
    return completion if completion.endswith(eos) else completion + eos


def _row(ids: list[int], prompt_len: int, max_seq_length: int) -> tuple[TokenizedRow, bool]:
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    truncated = len(ids) > max_seq_length
    return TokenizedRow(tuple(ids[:max_seq_length]), tuple(labels[:max_seq_length])), truncated


def tokenize_preference(
    record: dict, tokenizer, max_seq_length: int
) -> tuple[PreferencePair | None, bool]:
    """The record as a pair of rows and whether a row was cut to `max_seq_length`; None for
    a record whose prompt leaves no room for a completion token. Raises ValueError(reason)
    for a bad record (the caller adds the file and line)."""
    prompt, with_chosen, with_rejected = _sequences(record, tokenizer)
    prompt_len = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
    for name, ids in (("chosen", with_chosen), ("rejected", with_rejected)):
        if len(ids) <= prompt_len:
            raise ValueError(f"field {name!r} adds no token after the prompt")
    if prompt_len >= max_seq_length:
        return None, False
    chosen, cut_chosen = _row(with_chosen, prompt_len, max_seq_length)
    rejected, cut_rejected = _row(with_rejected, prompt_len, max_seq_length)
    return PreferencePair(chosen, rejected), cut_chosen or cut_rejected


def is_preference_record(keys: set[str]) -> bool:
    return set(PREFERENCE_KEYS) <= keys
