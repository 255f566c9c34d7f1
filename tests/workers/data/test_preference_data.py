"""Preference data: TRL's tokenization, its format found from the keys, bad records named."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data.dataset import DatasetError, load_dataset
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.data.preference_data import PreferencePair

from tests.helpers.data import write_jsonl

PAIR = {"prompt": "the cat sat on", "chosen": " the mat", "rejected": " a quick brown fox"}


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return load_tokenizer(str(tiny_base))


def test_a_pair_is_the_prompt_then_each_completion_with_eos_trained_alone(
    tokenizer, tmp_path: Path
) -> None:
    data = load_dataset(write_jsonl(tmp_path / "p.jsonl", [PAIR]), "auto", tokenizer, 64)
    assert data.format == "preference"
    (pair,) = data.rows
    assert isinstance(pair, PreferencePair)
    prompt = tokenizer(PAIR["prompt"])["input_ids"]  # with its BOS, as TRL tokenizes it
    for row, text in ((pair.chosen, PAIR["chosen"]), (pair.rejected, PAIR["rejected"])):
        assert list(row.input_ids) == tokenizer(PAIR["prompt"] + text + "</s>")["input_ids"]
        assert list(row.input_ids[: len(prompt)]) == prompt
        assert set(row.labels[: len(prompt)]) == {IGNORE_INDEX}
        completion = row.input_ids[len(prompt) :]
        assert list(row.labels[len(prompt) :]) == list(completion)
        assert completion[-1] == tokenizer.eos_token_id
        assert len(completion) > 2  # real words, not one repeated token
    assert pair.chosen.input_ids != pair.rejected.input_ids


def test_conversational_pairs_use_the_chat_template_and_its_generation_prompt(
    tokenizer, tmp_path: Path
) -> None:
    record = {
        "prompt": [{"role": "user", "content": "say hello"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "goodbye"}],
    }
    (pair,) = load_dataset(write_jsonl(tmp_path / "c.jsonl", [record]), "auto", tokenizer, 64).rows
    prompt = tokenizer.apply_chat_template(
        record["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(
        record["prompt"] + record["chosen"], tokenize=True, return_dict=True
    )["input_ids"]
    assert list(pair.chosen.input_ids) == list(full)
    trained = [t for t in pair.chosen.labels if t != IGNORE_INDEX]
    assert trained == list(full[len(prompt) :])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "", "rejected": " b"}, "field 'chosen' must not be empty"),
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, "chosen and rejected are the same"),
        ({"prompt": "a", "chosen": " b", "rejected": 3}, "field 'rejected' must be a string"),
        ({"prompt": "a", "chosen": " b", "rejected": None}, "missing field 'rejected'"),
    ],
)
def test_a_bad_pair_is_refused_naming_its_line(
    tokenizer, tmp_path: Path, record: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIR, record])
    with pytest.raises(DatasetError, match=f"bad.jsonl:2: {message}"):
        load_dataset(path, "preference", tokenizer, 64)


def test_a_prompt_that_fills_max_seq_length_is_dropped_and_counted(
    tokenizer, tmp_path: Path
) -> None:
    long = {"prompt": "the quick brown fox " * 10, "chosen": " yes", "rejected": " no"}
    data = load_dataset(write_jsonl(tmp_path / "l.jsonl", [PAIR, long]), "auto", tokenizer, 12)
    assert (len(data.rows), data.dropped_rows) == (1, 1)
    with pytest.raises(DatasetError, match="every record's prompt fills max_seq_length=12"):
        load_dataset(write_jsonl(tmp_path / "o.jsonl", [long]), "auto", tokenizer, 12)
