"""A base's kept facts come back only for the same files and transformers, never stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from carpool.workers.base import base_facts
from carpool.workers.base.base_facts import (
    BaseFacts,
    cache_dir,
    read_base_facts,
    remember_base_facts,
)

FACTS = BaseFacts({"model.layers.0.self_attn.q_proj": (64, 64)}, "TokenizersBackend")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARPOOL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def base(tiny_base: Path, tmp_path: Path) -> str:
    """A copy of the tiny base that a test may change."""
    return str(shutil.copytree(tiny_base, tmp_path / "base"))


def test_facts_come_back_as_kept(base: str) -> None:
    assert read_base_facts(base) is None
    remember_base_facts(base, FACTS)
    assert read_base_facts(base) == FACTS
    [kept] = (cache_dir() / "base-facts").glob("*.json")
    assert not list(kept.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "change",
    [
        lambda base: _edit_config(base, num_hidden_layers=3),
        lambda base: (base / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "Qwen2Tokenizer"})
        ),
        lambda base: (base / "tokenizer.json").write_bytes(
            (base / "tokenizer.json").read_bytes() + b" "
        ),
        lambda base: (base / "tokenizer.model").write_bytes(b"a sentencepiece model"),
    ],
    ids=["config", "tokenizer_config", "tokenizer.json", "another file"],
)
def test_a_changed_base_is_found_again(base: str, change) -> None:
    remember_base_facts(base, FACTS)
    change(Path(base))
    assert read_base_facts(base) is None


def test_another_transformers_is_found_again(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    remember_base_facts(base, FACTS)
    monkeypatch.setattr(base_facts, "version", lambda package: "0.0.1")
    assert read_base_facts(base) is None


def test_no_facts_for_what_is_no_local_base(tmp_path: Path) -> None:
    for name in ("org/model", str(tmp_path / "missing"), str(tmp_path)):
        remember_base_facts(name, FACTS)
        assert read_base_facts(name) is None
    assert not (cache_dir() / "base-facts").exists()


def test_damaged_facts_are_found_again(base: str) -> None:
    remember_base_facts(base, FACTS)
    [kept] = (cache_dir() / "base-facts").glob("*.json")
    for damage in ("{", json.dumps({"linear_shapes": {"q": [1]}, "tokenizer_class": "T"})):
        kept.write_text(damage)
        assert read_base_facts(base) is None


def test_an_unwritable_cache_costs_nothing_but_time(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("CARPOOL_CACHE_DIR", str(blocked))
    remember_base_facts(base, FACTS)  # no error
    assert read_base_facts(base) is None


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CARPOOL_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CARPOOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "carpool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "carpool"


def _edit_config(base: Path, **changes: object) -> None:
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **changes}))
