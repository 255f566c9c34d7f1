"""DPO jobs train as TRL's DPOTrainer trains the same LoRA on the same pairs.

A tiny random Llama in float32 on CPU, dropout off, TRL's learning rate, schedule, Adam
settings and gradient clipping set to the job's, every record in every step (so both sides
see the same pairs whatever order TRL's loader keeps). The adapter after 5 steps agrees to
1e-4 relative, and so do each step's loss and TRL's `rewards/*` and `logps/*` figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.spec.objective import DpoObjective
from carpool.workers.training.engine import Engine

from tests.helpers.data import write_jsonl
from tests.helpers.jobs import changed, job
from tests.helpers.peft_reference import adapter_tensors, max_relative_difference, peft_model_with

trl = pytest.importorskip("trl", reason="trl (a dev dependency) compares DPO with TRL's trainer")

STEPS = 5
PAIRS = [
    {"prompt": "the cat sat on", "chosen": " the mat", "rejected": " a fox"},
    {"prompt": "the quick brown", "chosen": " fox jumped", "rejected": " cat sat on a mat"},
    {"prompt": "Question: what is 2 plus 2?", "chosen": " Answer: 4.", "rejected": " Answer: 5."},
    {"prompt": "say hello", "chosen": " hello", "rejected": " goodbye and then some"},
]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def dpo_job(base: Path, data: Path, objective: DpoObjective):
    config = job(
        "dpo",
        base,
        data,
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        batch_size=len(PAIRS),
        learning_rate=2e-2,
        max_grad_norm=1.0,
        max_steps=STEPS,
        max_seq_length=64,
    )
    return changed(config, objective=objective)


def train_carpool(base: Path, config) -> tuple[dict, dict[str, torch.Tensor], list]:
    engine = Engine(str(base), device="cpu")
    start = engine.add_job(config).adapter.named_tensors()
    start = {k: v.clone() for k, v in start.items()}
    reports = [engine.train_round()[config.name] for _ in range(STEPS)]
    return start, engine.jobs[config.name].adapter.named_tensors(), reports


def train_trl(base: Path, config, start: dict[str, torch.Tensor], out: Path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    objective, t = config.objective, config.training
    model = peft_model_with(base, config, start)
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = trl.DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        max_steps=STEPS,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        max_length=t.max_seq_length,
        beta=objective.beta,
        loss_type=[objective.loss_type],
        label_smoothing=objective.label_smoothing,
        train_sampling_strategy="sequential",
        bf16=False,  # TRL's default is bf16 autocast; the comparison is in float32
        gradient_checkpointing=False,  # TRL's default; the same math, recomputed
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=t.seed,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer
    )
    trainer.train()
    history = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    return adapter_tensors(model), history


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
    config = dpo_job(tiny_base, pairs_file, objective)
    start, ours, reports = train_carpool(tiny_base, config)
    theirs, history = train_trl(tiny_base, config, start, tmp_path / "trl")

    # A fresh adapter is the reference itself: every log-ratio is 0 at the first step.
    assert reports[0].loss == pytest.approx(first_loss, rel=1e-6)
    assert len(history) == STEPS
    for step, (report, logged) in enumerate(zip(reports, history, strict=True)):
        assert report.loss == pytest.approx(logged["loss"], rel=1e-4, abs=1e-6)
        for name in METRICS:
            assert report.metrics[name] == pytest.approx(logged[name], rel=1e-4, abs=1e-5), name
        if step > 0:  # at the first step every margin is 0 but for rounding: a coin toss
            assert report.metrics["rewards/accuracies"] == logged["rewards/accuracies"]
    moved = max_relative_difference(ours, start)
    assert moved > 1e-2  # the comparison below means something
    assert max_relative_difference(ours, theirs) <= 1e-4
