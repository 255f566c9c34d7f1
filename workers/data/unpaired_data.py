"""Unpaired preference records (`{"prompt", "completion", "label"}`, TRL's format for KTO).

Each record is one completion labelled desirable (`label: true`) or not, tokenized as TRL's
KTOTrainer tokenizes it (as a preference pair's side is: the prompt alone and the prompt
followed by the completion, which starts where the two stop agreeing; plain text gets an
EOS, conversational data the chat template). Prompt and completion are kept apart because
KTO's KL estimate pairs each prompt with another record's completion; a row is cut to
`max_seq_length` after the two are joined, as TRL's collator cuts it. A record whose prompt
alone fills `max_seq_length` is dropped, as TRL drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from carpool.workers.data.dataset_rows import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.preference_data import common_prefix, template_ids, text_ids, with_eos
from carpool.workers.data.record_fields import chat_messages, field

UNPAIRED_KEYS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class LabelledCompletion:
    """One record: a prompt, a completion, and whether the completion is desirable."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    desirable: bool
    max_seq_length: int

    @property
    def row(self) -> TokenizedRow:
        return self.with_completion(self.completion_ids)

    @property
    def rows(self) -> tuple[TokenizedRow]:
        return (self.row,)

    def with_completion(self, completion_ids: tuple[int, ...]) -> TokenizedRow:
        """This prompt followed by `completion_ids` (trained), cut to `max_seq_length`."""
        ids = self.prompt_ids + completion_ids
        labels = (IGNORE_INDEX,) * len(self.prompt_ids) + completion_ids
        return TokenizedRow(ids[: self.max_seq_length], labels[: self.max_seq_length])


def mismatched_rows(records: Sequence[LabelledCompletion]) -> list[TokenizedRow]:
    """KTO's KL rows for these records, as TRL builds them: the completions rotated by one,
    (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})."""
    return [
        record.with_completion(records[i - 1].completion_ids) for i, record in enumerate(records)
    ]


def tokenize_unpaired(
    record: dict, tokenizer, max_seq_length: int
) -> tuple[LabelledCompletion | None, bool]:
    """The record, and whether its row was cut to `max_seq_length`; None for a record whose
    prompt leaves no room for a completion token. Raises ValueError(reason) for a bad record
    (the caller adds the file and line)."""
    label = field(record, "label", bool)
    if isinstance(record.get("prompt"), list):  # conversational
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "conversational preference data needs a tokenizer with a chat template"
            )
        prompt_messages = chat_messages(record, "prompt")
        prompt = template_ids(tokenizer, prompt_messages, generation_prompt=True)
        full = template_ids(tokenizer, prompt_messages + chat_messages(record, "completion"))
    else:
        text = field(record, "prompt", str)
        completion = field(record, "completion", str, non_empty=True)
        prompt = text_ids(tokenizer, text)
        full = text_ids(tokenizer, text + with_eos(tokenizer, completion))
    prompt_len = common_prefix(prompt, full)
    if len(full) <= prompt_len:
        raise ValueError("field 'completion' adds no token after the prompt")
    if prompt_len >= max_seq_length:
        return None, False
    labelled = LabelledCompletion(
        tuple(full[:prompt_len]), tuple(full[prompt_len:]), label, max_seq_length
    )
    return labelled, len(full) > max_seq_length


def is_unpaired_record(keys: set[str]) -> bool:
    return set(UNPAIRED_KEYS) <= keys
