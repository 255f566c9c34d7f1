"""The round function: checkpoint cadence, finishing jobs, failures, what each rank writes."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import pytest
import torch
from carpool.workers.peft_files.peft_format import read_adapter
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.lr_schedule import lr_multiplier
from carpool.workers.training.rounds import LocalOutputs, finish_job, run_round
from carpool.workers.training.training_job import TrainingJob

from tests.helpers.jobs import changed, job


def test_rounds_checkpoint_on_schedule_and_finish_jobs_as_they_end(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    a = job("a", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=5, save_steps=2)
    b = job("b", tiny_base, datasets["messages"], AdapterSpec(r=2), max_steps=3, save_steps=100)
    engine.add_job(a)
    engine.add_job(b)
    outputs = LocalOutputs(tmp_path / "adapters", tmp_path / "ckpt")
    rounds = []
    while engine.active_jobs():
        rounds.append({r.job: r for r in run_round(engine, outputs)})

    assert [sorted(r) for r in rounds] == [["a", "b"]] * 3 + [["a"]] * 2

    def steps_with(field: str) -> dict[str, list[int]]:
        return {
            name: [r[name].step for r in rounds if name in r and getattr(r[name], field)]
            for name in ("a", "b")
        }

    assert steps_with("checkpoint") == {"a": [2, 4, 5], "b": [3]}  # every save_steps, and last
    assert rounds[1]["a"].checkpoint == str(tmp_path / "ckpt" / "a" / "step-00000002")
    assert steps_with("adapter") == {"a": [5], "b": [3]}
    assert [r["b"].done for r in rounds[:3]] == [False, False, True]
    assert engine.jobs == {}  # both left the engine when they finished
    for name in ("a", "b"):
        assert read_adapter(tmp_path / "adapters" / name).r == 2
    # Two kept per job: the newest.
    assert sorted(p.name for p in (tmp_path / "ckpt" / "a").iterdir()) == [
        "step-00000004",
        "step-00000005",
    ]
    assert all(r.tokens > 0 and r.tokens_per_second > 0 for rs in rounds for r in rs.values())


def test_a_failed_job_leaves_with_nothing_written_and_the_others_go_on(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    for name in ("good", "bad"):
        config = job(name, tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=2)
        engine.add_job(changed(config, training={"save_steps": 1}))
    bad = engine.jobs["bad"].adapter
    bad.load_tensors({k: torch.full_like(v, float("nan")) for k, v in bad.named_tensors().items()})
    outputs = LocalOutputs(tmp_path / "adapters", tmp_path / "ckpt")

    first = {r.job: r for r in run_round(engine, outputs)}

    assert first["bad"].error == "loss is nan at step 1"
    assert (first["bad"].checkpoint, first["bad"].adapter, first["bad"].done) == (None, None, False)
    assert set(engine.jobs) == {"good"}
    assert first["good"].error is None and first["good"].checkpoint is not None
    (second,) = run_round(engine, outputs)
    assert (second.job, second.done, second.adapter) == (
        "good",
        True,
        str(tmp_path / "adapters/good"),
    )
    assert not (tmp_path / "ckpt" / "bad").exists() and not (tmp_path / "adapters" / "bad").exists()


def test_a_rank_without_outputs_writes_nothing_and_its_jobs_still_leave(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(job("a", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=2))

    results = [run_round(engine, None)[0] for _ in range(2)]

    assert [(r.step, r.checkpoint, r.adapter) for r in results] == [
        (1, None, None),
        (2, None, None),
    ]
    assert results[-1].done and engine.jobs == {}


def test_a_job_resumed_from_its_final_checkpoint_is_finished_at_admission(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = job("a", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=2)
    outputs = LocalOutputs(tmp_path / "adapters", tmp_path / "ckpt")
    first = Engine(str(tiny_base), device="cpu")
    first.add_job(config)
    while first.active_jobs():
        run_round(first, outputs)

    again = Engine(str(tiny_base), device="cpu")
    resumed = again.add_job(config, resume_from=tmp_path / "ckpt" / "a")
    assert resumed.done and again.active_jobs() == []
    assert finish_job(again, "a", LocalOutputs(tmp_path / "again")) == str(tmp_path / "again/a")
    assert again.jobs == {}
    exported = read_adapter(tmp_path / "again" / "a").weights
    trained = read_adapter(tmp_path / "adapters" / "a").weights
    assert exported.keys() == trained.keys()
    for module, (a, b) in trained.items():  # the checkpoint's weights, exactly
        assert torch.equal(exported[module][0], a) and torch.equal(exported[module][1], b)


def test_each_step_reports_its_learning_rate_gradient_norm_and_tokens_seen(
    tiny_base: Path, datasets: dict[str, Path], monkeypatch
) -> None:
    applied: list[tuple[str, float, float]] = []  # job, the gradients' norm, the one passed on
    finish_step = TrainingJob.finish_step

    def spy(self: TrainingJob, loss, rows, grad_norm: float, metrics=None, values=None):
        grads = [p.grad.double() for p in self.adapter.parameters() if p.requires_grad]
        applied.append((self.name, float(torch.sqrt(sum((g**2).sum() for g in grads))), grad_norm))
        return finish_step(self, loss, rows, grad_norm, metrics, values)

    monkeypatch.setattr(TrainingJob, "finish_step", spy)
    schedule = dict(lr_scheduler_type="linear", warmup_steps=2, learning_rate=1e-2)
    clipped = job(
        "clipped", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=4, max_grad_norm=1e-3,
        **schedule,
    )  # fmt: skip
    plain = job("plain", tiny_base, datasets["messages"], AdapterSpec(r=2), max_steps=4)
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(clipped)
    engine.add_job(plain)
    results = [r for _ in range(4) for r in run_round(engine, None)]

    assert len(applied) == len(results) == 8
    for (name, norm, passed), result in zip(applied, results, strict=True):
        assert result.job == name and result.grad_norm == passed
        assert passed == pytest.approx(norm, rel=1e-5) and norm > 0
    # Before clipping, as HF's Trainer reports it: above the clip threshold.
    assert all(r.grad_norm > 1e-3 for r in results if r.job == "clipped")
    rates = lr_multiplier("linear", 2, 4)
    assert [r.learning_rate for r in results if r.job == "clipped"] == pytest.approx(
        [1e-2 * rates(step) for step in range(4)]
    )
    assert [r.learning_rate for r in results if r.job == "plain"] == [5e-3] * 4
    for name in ("clipped", "plain"):
        mine = [r for r in results if r.job == name]
        assert [r.tokens_seen for r in mine] == list(accumulate(r.tokens for r in mine))
