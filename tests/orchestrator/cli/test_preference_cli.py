"""A DPO job through the CLI: validate notes dropped pairs, train exports PEFT's format with
TRL's reward figures in its history, plot adds a reward-margin panel."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml
from carpool.orchestrator.cli.main import main
from carpool.workers.training.training_history import read_log_history
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.data import write_jsonl


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_a_dpo_job_trains_exports_and_plots_its_reward_margin(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    records = [json.loads(line) for line in datasets["preference"].read_text().splitlines()]
    long_prompt = {"prompt": "the quick brown fox " * 20, "chosen": " yes", "rejected": " no"}
    data = write_jsonl(tmp_path / "pairs.jsonl", [*records, long_prompt])
    spec = {
        "name": "dpo",
        "base_model": str(tiny_base),
        "dataset": {"path": str(data)},
        "objective": {"type": "dpo", "loss_type": "sigmoid", "beta": 0.2},
        "adapter": {"r": 4, "lora_alpha": 8},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "max_seq_length": 48,
                     "logging_steps": 1},
    }  # fmt: skip
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(spec))

    assert main(["validate", str(path)]) == 0
    assert "1 records are dropped" in capsys.readouterr().out

    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out)]) == 0
    history = read_log_history(out / "dpo")
    steps = [e for e in history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all("rewards/margins" in e and "logps/chosen" in e for e in steps)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    PeftModel.from_pretrained(base, out / "dpo")  # PEFT's format, as every adapter

    plain, with_margin = tmp_path / "plain.png", tmp_path / "margin.png"
    text = tmp_path / "sft"
    sft = {**spec, "name": "sft", "dataset": {"path": str(datasets["text"])}}
    sft.pop("objective")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    assert main(["train", str(tmp_path / "sft.yaml"), "--out", str(text)]) == 0
    assert main(["plot", str(text / "sft"), "--out", str(plain)]) == 0
    assert main(["plot", str(out / "dpo"), str(text / "sft"), "--out", str(with_margin)]) == 0
    assert png_size(with_margin)[1] > png_size(plain)[1]  # the reward-margin panel below
