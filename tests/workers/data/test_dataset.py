"""Reading and tokenizing a job's dataset: labels per format, and errors that say where."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.data.dataset import (
    IGNORE_INDEX,
    DatasetError,
    load_dataset,
    read_records,
    resolve_format,
    tokenize_record,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello, how can I help you today?"},
    {"role": "assistant", "content": "The quick brown fox."},
    {"role": "user", "content": "what is two plus three?"},
    {"role": "assistant", "content": "five"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(build_tiny_base(tmp_path_factory.mktemp("tiny_base"))))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained_runs(tok, row) -> list[str]:
    """The trained tokens, decoded as contiguous runs (one per trained span)."""
    runs, current = [], []
    for tid, label in zip(row.input_ids, row.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tid  # unshifted: a trained label is the token itself
            current.append(tid)
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def untrained_text(tok, row) -> str:
    return tok.decode(
        [t for t, lab in zip(row.input_ids, row.labels, strict=True) if lab == IGNORE_INDEX]
    )


# --- formats -----------------------------------------------------------------


def test_text_trains_every_token_and_ends_with_eos(tok):
    row, truncated = tokenize_record({"text": "The lazy dog."}, "text", tok, 512)
    assert not truncated
    assert row.input_ids[0] == tok.bos_token_id
    assert row.input_ids[-1] == tok.eos_token_id
    assert list(row.input_ids) == tok("The lazy dog.")["input_ids"] + [tok.eos_token_id]
    assert row.labels == row.input_ids
    assert tok.decode(row.input_ids) == "<s>The lazy dog.</s>"


def test_text_does_not_double_an_existing_eos(tok):
    row, _ = tokenize_record({"text": "The lazy dog.</s>"}, "text", tok, 512)
    assert row.input_ids.count(tok.eos_token_id) == 1
    assert row.input_ids[-1] == tok.eos_token_id


def test_prompt_completion_masks_the_prompt(tok):
    record = {"prompt": "Question: what is two plus three?", "completion": " Answer: five."}
    row, _ = tokenize_record(record, "prompt_completion", tok, 512)
    prompt_ids = tok(record["prompt"])["input_ids"]
    completion_ids = tok(record["completion"], add_special_tokens=False)["input_ids"]
    assert list(row.input_ids) == prompt_ids + completion_ids + [tok.eos_token_id]
    assert list(row.labels) == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [
        tok.eos_token_id
    ]
    assert trained_runs(tok, row) == [" Answer: five.</s>"]
    assert untrained_text(tok, row) == "<s>Question: what is two plus three?"


def test_prompt_completion_allows_an_empty_prompt(tok):
    row, _ = tokenize_record({"prompt": "", "completion": "five"}, "prompt_completion", tok, 512)
    assert row.labels[0] == IGNORE_INDEX  # only the BOS
    assert trained_runs(tok, row) == ["five</s>"]


def test_messages_train_only_assistant_turns(tok):
    row, _ = tokenize_record({"messages": CHAT}, "messages", tok, 512)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert list(row.input_ids) == tok(full, add_special_tokens=False)["input_ids"]
    # Each assistant turn's content and its closing "</s>\n" (the template's turn end)
    # are trained; the "<|assistant|>\n" header and the other turns are not.
    assert trained_runs(tok, row) == ["The quick brown fox.</s>\n", "five</s>\n"]
    untrained = untrained_text(tok, row)
    assert untrained == (
        "<|system|>\nBe brief.</s>\n<|user|>\nhello, how can I help you today?</s>\n"
        "<|assistant|>\n<|user|>\nwhat is two plus three?</s>\n<|assistant|>\n"
    )


def test_messages_without_a_chat_template_are_rejected(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_record({"messages": CHAT}, "messages", plain, 512)


def test_messages_with_a_template_that_is_not_prefix_stable(tok):
    odd = copy.deepcopy(tok)
    # Renders the turn count first, so a longer conversation changes the start.
    odd.chat_template = "{{ messages | length }}" + odd.chat_template
    with pytest.raises(ValueError, match="prefix-stable"):
        tokenize_record({"messages": CHAT}, "messages", odd, 512)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": CHAT, "text": "x"}, "messages"),
        ({"prompt": "a", "completion": "b", "text": "x"}, "prompt_completion"),
        ({"text": "x", "prompt": "a"}, "text"),
    ],
)
def test_auto_detects_from_the_first_record(record, expected, tmp_path):
    assert resolve_format([record, {"other": 1}], "auto", tmp_path / "d.jsonl") == expected


def test_declared_format_wins_over_keys(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "text": "The lazy dog."}])
    ds = load_dataset(path, "text", tok, 512)
    assert ds.format == "text"
    assert tok.decode(ds.rows[0].input_ids) == "<s>The lazy dog.</s>"


def test_load_dataset_counts_truncated_rows(tok, tmp_path):
    records = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "dog"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    full = load_dataset(path, "auto", tok, 512)
    assert full.truncated_rows == 0 and full.format == "text" and full.source == path
    long_len = len(full.rows[0].input_ids)
    short_len = len(full.rows[1].input_ids)
    limit = short_len + 1
    assert long_len > limit
    cut = load_dataset(path, "auto", tok, limit)
    assert cut.truncated_rows == 1
    assert cut.rows[0].input_ids == full.rows[0].input_ids[:limit]
    assert cut.rows[0].labels == full.rows[0].labels[:limit]
    assert cut.rows[1] == full.rows[1]
    _, was_cut = tokenize_record(records[1], "text", tok, short_len)
    assert not was_cut  # exactly max_seq_length is not truncated


def test_parquet_round_trip_matches_jsonl(tok, tmp_path):
    records = [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert read_records(tmp_path / "d.parquet") == records
    from_parquet = load_dataset(tmp_path / "d.parquet", "auto", tok, 512)
    from_jsonl = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), "auto", tok, 512)
    assert from_parquet.format == "messages"
    assert from_parquet.rows == from_jsonl.rows
    assert trained_runs(tok, from_parquet.rows[1]) == ["ok</s>\n"]


def test_parquet_bad_row_reports_its_row_number(tok, tmp_path):
    table = pa.Table.from_pylist(
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "d.parquet", "auto", tok, 512)
    assert info.value.line == 2
    assert info.value.reason == "missing field 'completion'"


def test_blank_lines_are_skipped_but_counted(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n  \n{"text": 5}\n', encoding="utf-8")
    assert read_records(tmp_path / "d.jsonl")[0] == {"text": "a"}
    with pytest.raises(DatasetError) as info:
        load_dataset(path, "text", tok, 512)
    assert info.value.line == 4
    assert str(info.value) == f"{path}:4: field 'text' must be a string, got int"


# --- errors ------------------------------------------------------------------


def test_dataset_error_formats_and_pickles(tmp_path):
    with_line = DatasetError(tmp_path / "d.jsonl", "bad", 7)
    assert str(with_line) == f"{tmp_path / 'd.jsonl'}:7: bad"
    assert str(DatasetError(tmp_path / "d.jsonl", "bad")) == f"{tmp_path / 'd.jsonl'}: bad"
    again = pickle.loads(pickle.dumps(with_line))
    assert (again.path, again.line, again.reason, str(again)) == (
        with_line.path,
        7,
        "bad",
        str(with_line),
    )
    assert isinstance(with_line, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found") as info:
        read_records(tmp_path / "nope.jsonl")
    assert info.value.line is None


def test_bad_extension(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DatasetError, match="extension"):
        read_records(tmp_path / "d.csv")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DatasetError) as info:
        read_records(tmp_path / "d.jsonl")
    assert info.value.reason == "dataset is empty"


def test_invalid_json_reports_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DatasetError, match="invalid JSON") as info:
        read_records(path)
    assert info.value.line == 3
    assert str(path) in str(info.value)
    assert str(info.value).startswith(f"{path}:3: ")


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DatasetError, match="JSON object, got list") as info:
        read_records(path)
    assert info.value.line == 2


def test_non_utf8_bytes_report_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="UTF-8") as info:
        read_records(path)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("fmt", "record", "reason"),
    [
        ("text", {"txt": "a"}, "missing field 'text'"),
        ("text", {"text": ["a"]}, "field 'text' must be a string, got list"),
        ("text", {"text": ""}, "field 'text' must not be empty"),
        ("prompt_completion", {"prompt": "a"}, "missing field 'completion'"),
        ("prompt_completion", {"prompt": 1, "completion": "b"}, "field 'prompt' must be a string"),
        ("prompt_completion", {"prompt": "a", "completion": ""}, "must not be empty"),
        ("messages", {"messages": "hi"}, "field 'messages' must be a list, got str"),
        ("messages", {"messages": []}, "field 'messages' must not be empty"),
        ("messages", {"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ("messages", {"messages": [{"role": "user"}]}, "missing field 'content'"),
        (
            "messages",
            {"messages": [{"role": "assistant", "content": 3}]},
            "field 'content' must be a string",
        ),
    ],
)
def test_bad_record_names_the_field(tok, fmt, record, reason):
    with pytest.raises(ValueError, match=reason):
        tokenize_record(record, fmt, tok, 512)


def test_bad_record_in_file_gets_path_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DatasetError) as info:
        load_dataset(path, "auto", tok, 512)
    assert info.value.line == 2
    assert str(info.value) == f"{path}:2: missing field 'completion'"


def test_messages_without_an_assistant_turn(tok, tmp_path):
    user_only = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": user_only}])
    with pytest.raises(DatasetError, match="no assistant turn") as info:
        load_dataset(path, "auto", tok, 512)
    assert info.value.line == 2


def test_auto_with_unknown_keys_names_them(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DatasetError, match=r"\['answer', 'question'\]") as info:
        load_dataset(path, "auto", tok, 512)
    assert info.value.path == path


def test_unknown_declared_format(tmp_path):
    with pytest.raises(DatasetError, match="unknown format 'csv'"):
        resolve_format([{"text": "a"}], "csv", tmp_path / "d.jsonl")


def test_bad_max_seq_length(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="max_seq_length"):
        load_dataset(path, "text", tok, 0)
