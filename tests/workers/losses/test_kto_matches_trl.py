"""KTO jobs train as TRL's KTOTrainer trains the same LoRA on the same labelled completions.

Set up as `tests/helpers/trl_reference` says, with every record in every step in file order
(TRL's sampler is sequential and rotates completions for its KL rows within each batch of
the file; carpool rotates them within each step, the same rows here). The adapter after 5
steps agrees to 1e-4 relative, and so do each step's loss and TRL's `kl`, `rewards/*` and
`logps/*` figures. A fresh adapter is its reference: the first step's KL is 0, every
log-ratio is 0, and its loss is the weighted mean of 1 − σ(0) = 1/2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.workers.spec.objective import KtoObjective

from tests.helpers.data import write_jsonl
from tests.helpers.jobs import changed
from tests.helpers.peft_reference import adapter_tensors, max_relative_difference, peft_model_with
from tests.helpers.trl_reference import (
    logged_steps,
    pair_job,
    train_carpool,
    trl_training_arguments,
)

trl = pytest.importorskip("trl", reason="trl (a dev dependency) compares KTO with TRL's trainer")

RECORDS = [
    {"prompt": "the cat sat on", "completion": " the mat and then the fox jumped", "label": True},
    {"prompt": "the quick brown", "completion": " cat", "label": False},
    {
        "prompt": "Question: what is 2 plus 2?",
        "completion": " Answer: 4. Yes, four.",
        "label": True,
    },
    {"prompt": "say hello", "completion": " bye", "label": False},
    {"prompt": "a fox", "completion": " jumped over the lazy dog twice", "label": True},
]
FIGURES = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", RECORDS)


def test_kto_equals_trls_kto_trainer(tiny_base: Path, records_file: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    # Weights whose float32 rounding Adam does not amplify into the bar: with
    # undesirable_weight 1.5 some B entries' gradients nearly cancel, and carpool's own
    # float32 and float64 runs differ by 5e-4 after one step (3e-6 with these).
    objective = KtoObjective(type="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=0.75)
    config = changed(
        pair_job(tiny_base, records_file, objective),
        training={"batch_size": len(RECORDS), "shuffle": False},
    )
    start, ours, reports = train_carpool(tiny_base, config)
    args = trl.KTOConfig(
        **trl_training_arguments(config, tmp_path / "trl"),
        beta=objective.beta,
        desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
    )
    trainer = trl.KTOTrainer(
        model=peft_model_with(tiny_base, config, start),
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=AutoTokenizer.from_pretrained(tiny_base),
    )
    trainer.train()
    theirs, history = adapter_tensors(trainer.model), logged_steps(trainer)

    desirable = sum(r["label"] for r in RECORDS)
    weights = desirable * 1.0 + (len(RECORDS) - desirable) * 0.75
    assert reports[0].loss == pytest.approx(0.5 * weights / len(RECORDS), rel=1e-6)
    assert reports[0].metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    assert len(history) == len(reports)
    for report, logged in zip(reports, history, strict=True):
        assert report.loss == pytest.approx(logged["loss"], rel=1e-4, abs=1e-6)
        for name in FIGURES:
            assert report.metrics[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-5), name
    assert max(r.metrics["kl"] for r in reports) > 1e-2  # the KL term took part
    assert max_relative_difference(ours, start) > 1e-2  # the comparison below means something
    assert max_relative_difference(ours, theirs) <= 1e-4
