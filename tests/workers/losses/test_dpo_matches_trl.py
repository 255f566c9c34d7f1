"""DPO jobs train as TRL's DPOTrainer trains the same LoRA on the same pairs.

Set up as `tests/helpers/trl_reference` says. The adapter after 5 steps agrees to 1e-4
relative, and so do each step's loss and TRL's `rewards/*` and `logps/*` figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from carpool.workers.spec.objective import DpoObjective

from tests.helpers.data import write_jsonl
from tests.helpers.peft_reference import adapter_tensors, max_relative_difference, peft_model_with
from tests.helpers.trl_reference import (
    PAIRS,
    REWARD_FIGURES,
    STEPS,
    logged_steps,
    pair_job,
    train_carpool,
    trl_training_arguments,
)

trl = pytest.importorskip("trl", reason="trl (a dev dependency) compares DPO with TRL's trainer")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def train_trl(base: Path, config, start: dict[str, torch.Tensor], out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    objective = config.objective
    model = peft_model_with(base, config, start)
    args = trl.DPOConfig(
        **trl_training_arguments(config, out),
        beta=objective.beta,
        loss_type=[objective.loss_type],
        label_smoothing=objective.label_smoothing,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(base),
    )
    trainer.train()
    return adapter_tensors(model), logged_steps(trainer)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "first_loss"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("robust", 0.1, math.log(2)),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, (1 / (2 * 0.5)) ** 2),
    ],
)
def test_dpo_equals_trls_dpo_trainer(
    loss_type: str,
    label_smoothing: float,
    first_loss: float,
    tiny_base: Path,
    pairs_file: Path,
    tmp_path: Path,
) -> None:
    objective = DpoObjective(
        type="dpo", loss_type=loss_type, beta=0.5, label_smoothing=label_smoothing
    )
    config = pair_job(tiny_base, pairs_file, objective)
    start, ours, reports = train_carpool(tiny_base, config)
    theirs, history = train_trl(tiny_base, config, start, tmp_path / "trl")

    # A fresh adapter is the reference itself: every log-ratio is 0 at the first step.
    assert reports[0].loss == pytest.approx(first_loss, rel=1e-6)
    assert len(history) == STEPS
    for step, (report, logged) in enumerate(zip(reports, history, strict=True)):
        assert report.loss == pytest.approx(logged["loss"], rel=1e-4, abs=1e-6)
        for name in REWARD_FIGURES:
            assert report.metrics[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-5), name
        if step > 0:  # at the first step every margin is 0 but for rounding: a coin toss
            assert report.metrics["rewards/accuracies"] == logged["rewards/accuracies"]
    moved = max_relative_difference(ours, start)
    assert moved > 1e-2  # the comparison below means something
    assert max_relative_difference(ours, theirs) <= 1e-4
