"""A job's training data: read JSONL/parquet records and tokenize them into labelled rows.

Labels follow the HF causal-LM convention: same length as `input_ids`, unshifted
(the model shifts), IGNORE_INDEX wherever the token is not trained. Which tokens
are trained is decided here, once, so every engine path sees the same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from carpool.workers.data.dataset_rows import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.preference_data import (
    PreferencePair,
    is_preference_record,
    tokenize_preference,
)
from carpool.workers.data.record_fields import chat_messages, field
from carpool.workers.data.unpaired_data import (
    LabelledCompletion,
    is_unpaired_record,
    tokenize_unpaired,
)
from carpool.workers.spec.objective import PAIRED_FORMATS, SUPERVISED_FORMATS, UNPAIRED_FORMATS

# Supervised formats (a record is one row), paired ones (a record is two rows), and
# unpaired preferences (a row and its label).
FORMATS = SUPERVISED_FORMATS + PAIRED_FORMATS + UNPAIRED_FORMATS
# Record is what a dataset holds: a row, a pair of rows, or a labelled completion.
Record = TokenizedRow | PreferencePair | LabelledCompletion


class DatasetError(ValueError):
    """A problem in a dataset file, with where it is."""

    def __init__(self, path: Path, reason: str, line: int | None = None):
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # pickle across processes/actors with the same arguments
        return (type(self), (self.path, self.reason, self.line))


@dataclass(frozen=True)
class TokenizedDataset:
    """A file's records, tokenized: a row each, a pair of rows each (`preference`), or a
    labelled completion each (`unpaired_preference`)."""

    rows: tuple[Record, ...]
    format: str
    truncated_rows: int
    source: Path
    dropped_rows: int = 0  # preference records whose prompt leaves no room at max_seq_length


def _read_numbered(path: Path) -> list[tuple[int, dict]]:
    """Records with their 1-based line (JSONL) or row (parquet) number, for error reports."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise DatasetError(
            path, f"unsupported file extension {path.suffix!r} (use .jsonl or .parquet)"
        )
    if not path.is_file():
        raise DatasetError(path, "file not found")
    records: list[tuple[int, dict]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DatasetError(path, f"cannot read parquet: {e}") from e
        records = [(i, row) for i, row in enumerate(rows, start=1)]
    else:
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM from editors
            data = data[3:]
        for number, raw in enumerate(data.split(b"\n"), start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(path, f"not valid UTF-8 ({e.reason})", number) from e
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(path, f"invalid JSON: {e.msg} (column {e.colno})", number) from e
            if not isinstance(value, dict):
                raise DatasetError(
                    path, f"expected a JSON object, got {type(value).__name__}", number
                )
            records.append((number, value))
    if not records:
        raise DatasetError(path, "dataset is empty")
    return records


def read_records(path: Path) -> list[dict]:
    """The records of a .jsonl or .parquet file, in file order (blank JSONL lines skipped)."""
    return [record for _, record in _read_numbered(path)]


def resolve_format(records: list[dict], declared: str, path: Path) -> str:
    """The declared format, or for "auto" the one the first record's keys imply."""
    if declared in FORMATS:
        return declared
    if declared != "auto":
        raise DatasetError(
            path, f"unknown format {declared!r}; expected one of {FORMATS + ('auto',)}"
        )
    if not records:
        raise DatasetError(path, "dataset is empty")
    keys = set(records[0])
    if is_preference_record(keys):
        return "preference"
    if is_unpaired_record(keys):
        return "unpaired_preference"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DatasetError(
        path,
        f"cannot detect the format from the first record's keys {sorted(keys)}: "
        "expected 'messages', 'prompt' and 'completion', 'text', 'prompt', 'chosen' and "
        "'rejected', or 'prompt', 'completion' and 'label'",
    )


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    # The model must learn to stop; don't double an EOS the text already ends with.
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _tokenize_messages(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    clean = chat_messages(record, "messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "format 'messages' needs a tokenizer with a chat template; this one has none"
        )
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("no assistant turn in 'messages'")

    def render(msgs: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    # An assistant turn's characters are what its message adds to the render, after the
    # generation prompt that opens it: only then does the header stay untrained.
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(clean):
        if message["role"] != "assistant":
            continue
        before, upto = render(clean[:i], True), render(clean[: i + 1])
        if not upto.startswith(before):
            raise ValueError(
                "the chat template is not prefix-stable: rendering the conversation up to "
                f"message {i} does not start with the render of the turns before it plus the "
                "generation prompt, so assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    full = render(clean)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if end > start and any(s <= start and end <= e for s, e in spans) else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def prompt_ids(record: dict, tokenizer) -> list[int]:
    """A generation prompt's tokens, as training tokenizes the prompt part of a row.

    `{"prompt": ...}` is a `prompt_completion` row's prompt; `{"messages": [...]}`
    renders through the chat template with the generation prompt that opens the
    assistant's turn, as a `messages` row's assistant turn is preceded.
    """
    if "messages" in record:
        messages = chat_messages(record, "messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("'messages' needs a tokenizer with a chat template; this one has none")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, text, special=False)
    return _ids(tokenizer, field(record, "prompt", str), special=True)


def read_numbered_records(path: Path) -> list[tuple[int, dict]]:
    """A JSONL or parquet file's records with their 1-based line (row) numbers."""
    return _read_numbered(path)


def tokenize_record(
    record: dict, fmt: str, tokenizer, max_seq_length: int
) -> tuple[TokenizedRow, bool]:
    """One record as a labelled row, and whether it was cut to `max_seq_length`.

    Raises ValueError(reason) for a bad record; the caller adds the path and line.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    if fmt == "text":
        ids = _with_eos(
            _ids(tokenizer, field(record, "text", str, non_empty=True), special=True), tokenizer
        )
        labels = list(ids)
    elif fmt == "prompt_completion":
        prompt = _ids(tokenizer, field(record, "prompt", str), special=True)
        completion = field(record, "completion", str, non_empty=True)
        answer = _with_eos(_ids(tokenizer, completion, special=False), tokenizer)
        ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    elif fmt == "messages":
        ids, labels = _tokenize_messages(record, tokenizer)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return TokenizedRow(tuple(ids), tuple(labels)), truncated


def load_dataset(path: Path, fmt: str, tokenizer, max_seq_length: int) -> TokenizedDataset:
    """Read, resolve the format of, and tokenize every record of a dataset file."""
    if max_seq_length < 1:  # a config error, not a problem in the file: no line number
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    path = Path(path)
    numbered = _read_numbered(path)
    resolved = resolve_format([r for _, r in numbered], fmt, path)
    rows: list[Record] = []
    truncated_rows = dropped_rows = 0
    for number, record in numbered:
        try:
            if resolved == "preference":
                row, truncated = tokenize_preference(record, tokenizer, max_seq_length)
            elif resolved == "unpaired_preference":
                row, truncated = tokenize_unpaired(record, tokenizer, max_seq_length)
            else:
                row, truncated = tokenize_record(record, resolved, tokenizer, max_seq_length)
        except ValueError as e:
            raise DatasetError(path, str(e), number) from e
        if row is None:  # as TRL drops it: a prompt alone fills max_seq_length
            dropped_rows += 1
            continue
        rows.append(row)
        truncated_rows += truncated
    if not rows:
        raise DatasetError(
            path, f"every record's prompt fills max_seq_length={max_seq_length}: nothing to train"
        )
    return TokenizedDataset(tuple(rows), resolved, truncated_rows, path, dropped_rows)
