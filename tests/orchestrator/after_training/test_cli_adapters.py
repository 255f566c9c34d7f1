"""`carpool eval` and `carpool generate` from the command line: output, and refusals before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.workers.after_training import fused_inference
from carpool.workers.base.base_fingerprint import PROVENANCE_FILE
from carpool.workers.base.tiny_base import build_tiny_base

from tests.helpers.data import write_jsonl
from tests.helpers.finished_adapters import adapters_of_each_kind


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return adapters_of_each_kind(tiny_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals come before the base loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the input was checked")

    monkeypatch.setattr(fused_inference, "load_base", refuse)


def test_eval_prints_adapters_sorted_by_loss(
    tiny_base: Path, adapters: dict[str, Path], datasets: dict[str, Path], capsys
) -> None:
    args = ["eval", "--base", str(tiny_base), "--dataset", str(datasets["text"])]
    names = [str(adapters["lora"]), f"mine={adapters['vera']}"]
    assert main([*args, *names, "--include-base", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # one document, as every --json prints
    assert {r["adapter"] for r in rows} == {"lora", "mine", "base"}
    assert [r["eval_loss"] for r in rows] == sorted(r["eval_loss"] for r in rows)
    assert len({r["tokens"] for r in rows}) == 1
    assert main([*args, *names]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ADAPTER", "LOSS", "PERPLEXITY", "TOKENS"]
    assert sorted(line.split()[0] for line in table[1:]) == ["lora", "mine"]


def test_generate_writes_one_line_per_prompt_and_adapter(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "the quick", "adapter": "dora"},
            {"messages": [{"role": "user", "content": "say hello 3"}], "adapter": "lora"},
        ],
    )
    base = ["generate", "--base", str(tiny_base), "--prompts", str(prompts)]
    chosen = [str(adapters["lora"]), str(adapters["dora"])]
    assert main([*base, *chosen, "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["adapter"], r["prompt"]) for r in lines] == [
        ("dora", "the quick"),
        ("lora", [{"role": "user", "content": "say hello 3"}]),
    ]
    assert all(isinstance(r["completion"], str) for r in lines)
    out = tmp_path / "out.jsonl"
    every = [*chosen, "--all-adapters", "--include-base", "--out", str(out)]
    assert main([*base, *every, "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["lora", "dora", "base"] * 2


@pytest.mark.parametrize(
    ("rows", "named", "message"),
    [
        (
            [{"prompt": "hi", "adapter": "nope"}],
            True,
            "prompts.jsonl:1: adapter 'nope' is not one of",
        ),
        ([{"prompt": "hi"}], True, 'prompts.jsonl:1: no "adapter" in this row'),
        ([{"text": "hi", "adapter": "lora"}], True, 'needs "prompt" or "messages"'),
        ([{"prompt": "hi"}], False, "name at least one ADAPTER"),
    ],
)
def test_generate_refuses_bad_prompts_before_loading(
    tiny_base: Path, adapters, tmp_path: Path, capsys, no_model_load, rows, named, message
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    chosen = [str(adapters["lora"]), str(adapters["vera"])] if named else []
    argv = ["generate", "--base", str(tiny_base), "--prompts", str(prompts), *chosen]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_an_adapter_of_another_base_is_refused_naming_both(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys, no_model_load, adapters
) -> None:
    other = build_tiny_base(tmp_path / "other", hidden_size=32, num_heads=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in adapters["lora"].iterdir():
        (mine / f.name).write_bytes(f.read_bytes())
    record = {"base_model": str(other), "base_fingerprint": "sha256:" + "0" * 64}
    (mine / PROVENANCE_FILE).write_text(json.dumps(record))
    argv = ["eval", str(mine), "--base", str(tiny_base), "--dataset", str(datasets["text"])]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "trained on base" in err and str(other) in err and str(tiny_base) in err


def test_eval_refuses_a_missing_adapter_and_bad_options(tiny_base: Path, capsys, tmp_path) -> None:
    argv = ["eval", str(tmp_path / "gone"), "--base", str(tiny_base), "--dataset", "d.jsonl"]
    assert main(argv) == 1
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--base", "b", "--prompts", "p.jsonl", "--top-p", "0"])
    assert e.value.code == 2
    assert "--top-p" in capsys.readouterr().err
