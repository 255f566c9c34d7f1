"""Jobs sharing a dataset file tokenize it once; a changed file or other settings read it again."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from carpool.workers.base.base_model import load_tokenizer
from carpool.workers.data import dataset as dataset_module
from carpool.workers.data.dataset import DatasetError
from carpool.workers.data.dataset_cache import DatasetCache, file_version
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec
from carpool.workers.training.engine import Engine

from tests.helpers.data import write_jsonl
from tests.helpers.jobs import job

ROWS = [{"text": f"the quick brown fox {i}"} for i in range(5)]


@pytest.fixture
def tokenized(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every record `load_dataset` tokenizes, in order."""
    seen: list[dict] = []
    real = dataset_module.tokenize_record

    def spy(record: dict, *args, **kwargs):
        seen.append(record)
        return real(record, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "tokenize_record", spy)
    return seen


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return load_tokenizer(str(tiny_base))


def test_a_file_is_tokenized_once_per_settings(tmp_path, tokenizer, tokenized):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = DatasetCache(tokenizer)
    first = cache.load(path, "text", 64)
    assert cache.load(path, "text", 64) is first
    assert len(tokenized) == len(ROWS)
    # Other settings shape other rows: read again.
    short = cache.load(path, "text", 3)
    assert short is not first and max(len(r.input_ids) for r in short.rows) == 3
    assert cache.load(path, "auto", 64) is not first
    assert len(tokenized) == 3 * len(ROWS)


def test_a_changed_file_is_read_again(tmp_path, tokenizer, tokenized):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = DatasetCache(tokenizer)
    before = cache.load(path, "text", 64)
    write_jsonl(path, ROWS[:2])
    stat = path.stat()  # a write within the clock's tick still moves the version
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = cache.load(path, "text", 64)
    assert len(before.rows) == len(ROWS) and len(after.rows) == 2
    assert len(tokenized) == len(ROWS) + 2


def test_file_version_changes_with_size_and_is_none_for_a_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    version = file_version(path)
    with path.open("a") as f:
        f.write('{"text": "one more"}\n')
    assert file_version(path) != version
    assert file_version(tmp_path / "missing.jsonl") is None


def test_errors_are_not_kept(tmp_path, tokenizer):
    cache = DatasetCache(tokenizer)
    with pytest.raises(DatasetError, match="file not found"):
        cache.load(tmp_path / "missing.jsonl", "text", 64)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "no text field"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: missing field 'text'"):
        cache.load(path, "text", 64)
    write_jsonl(path, ROWS)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000_000))
    assert len(cache.load(path, "text", 64).rows) == len(ROWS)


def test_a_dataset_no_one_holds_is_let_go(tmp_path, tokenizer, tokenized):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = DatasetCache(tokenizer)
    cache.load(path, "text", 64)
    gc.collect()
    cache.load(path, "text", 64)
    assert len(tokenized) == 2 * len(ROWS)


def test_engine_jobs_sharing_a_file_share_its_rows_not_their_state(tiny_base, datasets, tokenized):
    engine = Engine(str(tiny_base), device="cpu")
    adapter = AdapterSpec(r=2, lora_alpha=4, target_modules=["q_proj"])
    eval_data = DatasetSpec(path=datasets["text"])
    a = engine.add_job(
        job("a", tiny_base, datasets["text"], adapter, max_seq_length=32).model_copy(
            update={"eval_dataset": eval_data}
        )
    )
    b = engine.add_job(job("b", tiny_base, datasets["text"], adapter, max_seq_length=32))
    other = engine.add_job(job("c", tiny_base, datasets["text"], adapter, max_seq_length=16))
    assert a.dataset is b.dataset is a.eval_dataset
    assert other.dataset is not a.dataset
    assert len(tokenized) == 2 * len(a.dataset.rows)  # once per max_seq_length
    engine.train_round()
    assert a.rows_consumed == b.rows_consumed == 4 and a.optimizer is not b.optimizer
    assert a.adapter is not b.adapter
