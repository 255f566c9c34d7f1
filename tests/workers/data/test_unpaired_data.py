"""Unpaired preference data (KTO's): TRL's tokenization, its format found from the keys,
KL rows as TRL rotates them, bad records named."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data.dataset import DatasetError, load_dataset
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.data.unpaired_data import LabelledCompletion, mismatched_rows

from tests.helpers.data import write_jsonl

RECORDS = [
    {"prompt": "the cat sat on", "completion": " the mat", "label": True},
    {"prompt": "the quick brown", "completion": " fox jumped over", "label": False},
    {"prompt": "say", "completion": " hello", "label": True},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return load_tokenizer(str(tiny_base))


def test_a_record_is_its_prompt_then_its_completion_with_eos_trained_alone(
    tokenizer, tmp_path: Path
) -> None:
    data = load_dataset(write_jsonl(tmp_path / "u.jsonl", RECORDS), "auto", tokenizer, 64)
    assert data.format == "unpaired_preference"
    assert [r.desirable for r in data.rows] == [True, False, True]
    first = data.rows[0]
    assert isinstance(first, LabelledCompletion)
    prompt = tokenizer(RECORDS[0]["prompt"])["input_ids"]  # with its BOS, as TRL's
    full = tokenizer(RECORDS[0]["prompt"] + RECORDS[0]["completion"] + "</s>")["input_ids"]
    assert list(first.row.input_ids) == full
    assert set(first.row.labels[: len(prompt)]) == {IGNORE_INDEX}
    assert list(first.row.labels[len(prompt) :]) == full[len(prompt) :]
    assert len(first.completion_ids) > 2  # real words, not one repeated token


def test_kl_rows_pair_each_prompt_with_the_previous_records_completion(
    tokenizer, tmp_path: Path
) -> None:
    """(x_1, y_n), (x_2, y_1), ..., cut to max_seq_length after joining, as TRL's collator."""
    data = load_dataset(write_jsonl(tmp_path / "u.jsonl", RECORDS), "auto", tokenizer, 9)
    rows = mismatched_rows(data.rows)
    for i, (record, row) in enumerate(zip(data.rows, rows, strict=True)):
        other = data.rows[i - 1]
        joined = record.prompt_ids + other.completion_ids
        assert row.input_ids == joined[:9]
        assert row.labels == ((IGNORE_INDEX,) * len(record.prompt_ids) + other.completion_ids)[:9]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "completion": " b", "label": "yes"}, "field 'label' must be a boolean"),
        ({"prompt": "a", "completion": " b", "label": 1}, "field 'label' must be a boolean"),
        ({"prompt": "a", "completion": "", "label": True}, "field 'completion' must not be empty"),
        ({"prompt": "a", "completion": " b", "label": None}, "missing field 'label'"),
    ],
)
def test_a_bad_record_is_refused_naming_its_line(
    tokenizer, tmp_path: Path, record: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
    with pytest.raises(DatasetError, match=f"bad.jsonl:2: {message}"):
        load_dataset(path, "unpaired_preference", tokenizer, 64)


def test_a_prompt_that_fills_max_seq_length_is_dropped_and_counted(
    tokenizer, tmp_path: Path
) -> None:
    long = {"prompt": "the quick brown fox " * 10, "completion": " yes", "label": False}
    data = load_dataset(write_jsonl(tmp_path / "l.jsonl", [*RECORDS, long]), "auto", tokenizer, 12)
    assert (len(data.rows), data.dropped_rows) == (3, 1)


def test_conversational_records_use_the_chat_template_and_its_generation_prompt(
    tokenizer, tmp_path: Path
) -> None:
    record = {
        "prompt": [{"role": "user", "content": "say hello"}],
        "completion": [{"role": "assistant", "content": "hello"}],
        "label": True,
    }
    (row,) = load_dataset(write_jsonl(tmp_path / "c.jsonl", [record]), "auto", tokenizer, 64).rows
    prompt = tokenizer.apply_chat_template(
        record["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(
        record["prompt"] + record["completion"], tokenize=True, return_dict=True
    )["input_ids"]
    assert list(row.row.input_ids) == list(full)
    assert list(row.completion_ids) == list(full[len(prompt) :])
