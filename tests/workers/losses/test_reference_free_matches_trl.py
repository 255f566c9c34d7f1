"""SimPO, CPO and ORPO jobs train as TRL's CPOTrainer and ORPOTrainer train the same LoRA.

Set up as `tests/helpers/trl_reference` says. TRL's CPO and ORPO trainers tokenize pairs
their own way (prompt and completion tokenized together, BOS and EOS added where missing):
the test first checks that, on these pairs, their rows are carpool's, so what follows
compares the objectives, not two tokenizations. The adapter after 5 steps agrees to 1e-4
relative, and so do each step's loss, TRL's `rewards/*` and `logps/*` figures, its
`nll_loss` and ORPO's log-odds figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.spec.objective import CpoObjective, OrpoObjective, SimpoObjective

from tests.helpers.data import write_jsonl
from tests.helpers.peft_reference import adapter_tensors, max_relative_difference, peft_model_with
from tests.helpers.trl_reference import (
    PAIRS,
    REWARD_FIGURES,
    logged_steps,
    pair_job,
    train_carpool,
    trl_training_arguments,
)

pytest.importorskip("trl", reason="trl (a dev dependency) compares with TRL's trainers")

OBJECTIVES = {
    "simpo": (SimpoObjective(type="simpo", beta=2.0, simpo_gamma=0.5), ()),
    "cpo": (CpoObjective(type="cpo", beta=0.5, cpo_alpha=0.7), ("nll_loss",)),
    "orpo": (
        OrpoObjective(type="orpo", beta=0.5),
        ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    ),
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def trl_trainer(base: Path, config, start: dict[str, torch.Tensor], out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    objective = config.objective
    common = trl_training_arguments(config, out)
    if objective.type == "orpo":
        args, trainer_class = ORPOConfig(**common, beta=objective.beta), ORPOTrainer
    elif objective.type == "simpo":
        args = CPOConfig(
            **common,
            beta=objective.beta,
            loss_type="simpo",
            cpo_alpha=0.0,
            simpo_gamma=objective.simpo_gamma,
        )
        trainer_class = CPOTrainer
    else:
        args = CPOConfig(
            **common, beta=objective.beta, loss_type="sigmoid", cpo_alpha=objective.cpo_alpha
        )
        trainer_class = CPOTrainer
    return trainer_class(
        model=peft_model_with(base, config, start),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(base),
    )


def carpool_rows(base: Path, data: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    from carpool.workers.data.dataset import load_dataset
    from transformers import AutoTokenizer

    dataset = load_dataset(data, "preference", AutoTokenizer.from_pretrained(base), 64)
    return [(row.input_ids, row.labels) for pair in dataset.rows for row in pair.rows]


def trl_rows(trainer) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [
        (tuple(r[f"{side}_input_ids"]), tuple(r[f"{side}_labels"]))
        for r in trainer.train_dataset
        for side in ("chosen", "rejected")
    ]


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_objective_equals_trls_trainer(
    kind: str, tiny_base: Path, pairs_file: Path, tmp_path: Path
) -> None:
    objective, own_figures = OBJECTIVES[kind]
    config = pair_job(tiny_base, pairs_file, objective)
    start, ours, reports = train_carpool(tiny_base, config)
    trainer = trl_trainer(tiny_base, config, start, tmp_path / "trl")
    rows = carpool_rows(tiny_base, pairs_file)
    assert trl_rows(trainer) == rows  # the same tokens, so the objectives are compared
    assert all(any(label != IGNORE_INDEX for label in labels) for _, labels in rows)
    trainer.train()
    theirs, history = adapter_tensors(trainer.model), logged_steps(trainer)

    assert len(history) == len(reports)
    for report, logged in zip(reports, history, strict=True):
        assert report.loss == pytest.approx(logged["loss"], rel=1e-4, abs=1e-6)
        for name in (*REWARD_FIGURES, "rewards/accuracies", *own_figures):
            assert report.metrics[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-5), name
    if kind == "simpo":  # no reference: the first loss is the policy's own, not ln 2
        assert not math.isclose(reports[0].loss, math.log(2), rel_tol=1e-3)
    moved = max_relative_difference(ours, start)
    assert moved > 1e-2  # the comparison below means something
    assert max_relative_difference(ours, theirs) <= 1e-4
