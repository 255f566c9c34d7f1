"""Evaluation on held-out rows: the loss a user would compute, on schedule, fused."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from carpool.workers.data.dataset import IGNORE_INDEX
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import run_round

from tests.helpers.data import write_jsonl
from tests.helpers.jobs import STEPS, changed, job, three_jobs
from tests.helpers.round_driver import train_to_end


def with_eval(config: JobSpec, data: Path, eval_steps: int | None) -> JobSpec:
    return changed(config, eval_dataset=DatasetSpec(path=data), training={"eval_steps": eval_steps})


def reference_eval_loss(engine: Engine, name: str) -> float:
    """One row at a time, no padding: summed token cross-entropy over all trained tokens."""
    total, count = 0.0, 0
    for row in engine.jobs[name].eval_dataset.rows:
        logits = engine.logits(name, torch.tensor([row.input_ids]))[0, :-1]
        labels = torch.tensor(row.labels[1:])
        keep = labels != IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def test_eval_loss_on_schedule_equals_a_row_by_row_reference(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    text, qa, chat = three_jobs(tiny_base, datasets)
    configs = [
        with_eval(text, datasets["prompt_completion"], eval_steps=3),
        with_eval(chat, datasets["messages"], eval_steps=None),  # at the end only
        qa,  # no eval dataset: never evaluated
    ]
    engine = Engine(str(tiny_base), device="cpu", micro_batch_tokens=200)
    for config in configs:
        engine.add_job(config)
    evaluated: dict[str, list[int]] = {c.name: [] for c in configs}
    rounds = 0
    while engine.active_jobs():
        for result in run_round(engine, None):
            if result.eval_loss is not None:
                evaluated[result.job].append(result.step)
                last = result.eval_loss
                if result.job == "text" and result.step == 3:
                    assert abs(last - reference_eval_loss(engine, "text")) <= 1e-5 * last
        rounds += 1
        if rounds == 5:
            # Between rounds, for every job with eval rows; evaluate() on demand agrees.
            on_demand = engine.evaluate()
            assert set(on_demand) == {"text", "chat"}
            for name, loss in on_demand.items():
                assert abs(loss - reference_eval_loss(engine, name)) <= 1e-5 * loss, name
    assert rounds == STEPS
    assert evaluated["text"] == [s for s in range(1, STEPS + 1) if s % 3 == 0 or s == STEPS]
    assert evaluated["chat"] == [STEPS]
    assert evaluated["qa"] == []


def test_eval_loss_does_not_depend_on_neighbours(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    target = with_eval(
        job("target", tiny_base, datasets["text"], AdapterSpec(r=4, lora_dropout=0.2),
            max_steps=4),
        datasets["prompt_completion"], eval_steps=2,
    )  # fmt: skip
    neighbour = with_eval(
        job("other", tiny_base, datasets["messages"], AdapterSpec(r=8), max_steps=6),
        datasets["text"], eval_steps=1,
    )  # fmt: skip

    def eval_losses(configs: list[JobSpec]) -> list[float]:
        engine = Engine(str(tiny_base), device="cpu", micro_batch_tokens=150)
        for config in configs:
            engine.add_job(config)
        out = []
        while engine.active_jobs():
            for result in run_round(engine, None):
                if result.job == "target" and result.eval_loss is not None:
                    out.append(result.eval_loss)
        return out

    alone = eval_losses([target])
    beside = eval_losses([neighbour, target])
    assert len(alone) == 2
    assert all(abs(a - b) <= 1e-6 * a for a, b in zip(alone, beside, strict=True))
    assert alone[0] != alone[1]  # training moved the eval loss between the two


def test_eval_dataset_is_never_trained_on(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Training data is all the adapter sees: swapping eval rows leaves the weights bitwise equal."""
    other_eval = write_jsonl(tmp_path / "eval.jsonl", [{"text": "zebra " * n} for n in (3, 9)])
    config = job("a", tiny_base, datasets["text"], AdapterSpec(r=4), max_steps=3)
    weights = []
    for data in (datasets["prompt_completion"], other_eval):
        engine = Engine(str(tiny_base), device="cpu")
        engine.add_job(with_eval(config, data, eval_steps=1))
        weights.append(train_to_end(engine)["a"].adapter.named_tensors())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
