"""The demo's data and its pretrained base: one token per word, a cache that is never half-built."""

from __future__ import annotations

import json
from pathlib import Path

import carpool.orchestrator.demo.demo_base as demo_base
import pytest
import yaml
from carpool.orchestrator.demo.demo_base import RECIPE_FILE, Recipe, build_demo_base
from carpool.orchestrator.demo.run import phrase_and_answer, prepare
from carpool.workers.data.dataset import IGNORE_INDEX, load_dataset, read_records
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

QUICK = Recipe(steps=2, batch_size=4)  # the real path, without the minute of training
PRETRAIN = demo_base.pretrain


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return prepare(tmp_path_factory.mktemp("demo"), QUICK)


def test_every_word_of_the_demo_rows_is_one_token(demo: list[Path]) -> None:
    spec = yaml.safe_load(demo[0].read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    for path in demo:
        spec = yaml.safe_load(path.read_text())
        for split in ("dataset", "eval_dataset"):
            data = Path(spec[split]["path"])
            rows = load_dataset(data, "auto", tokenizer, max_seq_length=64).rows
            for record, row in zip(read_records(data), rows, strict=True):
                for text in phrase_and_answer(record):
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    assert [tokenizer.decode([i]).strip() for i in ids] == text.split()
                # Trained: the answer's words, then EOS (and a chat turn's closing newline).
                answer = phrase_and_answer(record)[1]
                trained = [t for t in row.labels if t != IGNORE_INDEX]
                assert len(trained) == len(answer.split()) + (2 if "messages" in record else 1)


def test_held_out_phrases_are_in_no_training_row(demo: list[Path]) -> None:
    for path in demo:
        spec = yaml.safe_load(path.read_text())
        train = {phrase_and_answer(r)[0] for r in read_records(Path(spec["dataset"]["path"]))}
        held_out = [
            phrase_and_answer(r)[0] for r in read_records(Path(spec["eval_dataset"]["path"]))
        ]
        assert held_out and not train & set(held_out)


def test_the_base_is_a_plain_llama_with_its_recipe(demo: list[Path]) -> None:
    base = Path(yaml.safe_load(demo[0].read_text())["base_model"])
    assert isinstance(AutoModelForCausalLM.from_pretrained(base), LlamaForCausalLM)
    record = json.loads((base / RECIPE_FILE).read_text())
    assert record["recipe"]["steps"] == QUICK.steps
    assert not list(base.parent.glob(".*partial*"))


def count_pretraining(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    calls: list[int] = []

    def pretrain(*args, **kwargs):
        calls.append(1)
        if fail:
            raise KeyboardInterrupt  # as if cut short by ^C
        return PRETRAIN(*args, **kwargs)

    monkeypatch.setattr(demo_base, "pretrain", pretrain)
    return calls


def test_a_built_base_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_pretraining(monkeypatch)
    out = build_demo_base(tmp_path / "base", recipe=QUICK, log=lambda line: None)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert build_demo_base(out, recipe=QUICK, log=lambda line: None) == out
    assert calls == [1]
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    # Another recipe, or other phrases to leave out, make another base.
    build_demo_base(out, recipe=Recipe(steps=3, batch_size=4), log=lambda line: None)
    build_demo_base(
        out, recipe=Recipe(steps=3, batch_size=4), avoid=["a cat"], log=lambda line: None
    )
    assert calls == [1, 1, 1]


def test_an_interrupted_build_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "base"
    calls = count_pretraining(monkeypatch, fail=True)
    with pytest.raises(KeyboardInterrupt):
        build_demo_base(out, recipe=QUICK, log=lambda line: None)
    assert calls == [1]
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written left

    # A killed build's folder, and a base with no recipe (the old random-init demo base):
    # neither is taken for a finished base.
    (tmp_path / ".base.partial").mkdir()
    (tmp_path / ".base.partial" / "config.json").write_text("{}")
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    calls = count_pretraining(monkeypatch)
    build_demo_base(out, recipe=QUICK, log=lambda line: None)
    assert calls == [1]
    assert (out / RECIPE_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), LlamaForCausalLM)
