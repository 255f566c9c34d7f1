"""Loss history: HF Trainer's logging cadence, the same alone, fused and resumed, and its
`trainer_state.json` export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec
from carpool.workers.training.checkpoint import save_checkpoint
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import JobRoundResult, LocalOutputs, run_round
from carpool.workers.training.training_history import StepRecord, TrainingHistory, read_log_history
from transformers import TrainerState

from tests.helpers.jobs import changed, job
from tests.helpers.round_driver import KeepFinished


def _step(step: int, loss: float) -> StepRecord:
    return StepRecord(
        step=step, loss=loss, learning_rate=0.1, grad_norm=step, epoch=step / 4, tokens_seen=step
    )


def test_train_entries_every_logging_steps_and_at_the_end_hold_the_mean_loss() -> None:
    history = TrainingHistory(logging_steps=3, total_steps=7)
    for step in range(1, 5):
        history.record_step(_step(step, float(step)))
    resumed = TrainingHistory(logging_steps=3, total_steps=7)
    resumed.load_state_dict(history.state_dict())  # mid-window: step 4's loss is pending
    for step in range(5, 8):
        resumed.record_step(_step(step, float(step)))
    resumed.record_eval(7, 1.75, 0.5)

    assert [(e["step"], e["loss"]) for e in resumed.entries if "loss" in e] == [
        (3, 2.0),  # mean of steps 1-3, as the Trainer logs it
        (6, 5.0),
        (7, 7.0),  # the last step is always logged
    ]
    assert resumed.entries[0] == {
        "loss": 2.0,
        "grad_norm": 3,
        "learning_rate": 0.1,
        "epoch": 0.75,
        "num_input_tokens_seen": 3,
        "step": 3,
    }
    assert resumed.entries[-1] == {"eval_loss": 0.5, "epoch": 1.75, "step": 7}


def _history_job(tiny_base: Path, datasets: dict[str, Path]) -> JobSpec:
    config = job("h", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=7, logging_steps=3)
    eval_dataset = DatasetSpec(path=datasets["one_row"])
    return changed(config, eval_dataset=eval_dataset, training={"eval_steps": 4})


def _run(engine: Engine, rounds: int | None = None) -> tuple[list[JobRoundResult], dict]:
    """Rounds to the end (or `rounds` of them): job h's results, and the finished jobs."""
    results, outputs, done = [], KeepFinished(), 0
    while engine.active_jobs() and (rounds is None or done < rounds):
        results += [r for r in run_round(engine, outputs) if r.job == "h"]
        done += 1
    return results, outputs.jobs


def _assert_close(got: list[dict], expected: list[dict], rel: float) -> None:
    assert [e.keys() for e in got] == [e.keys() for e in expected]
    for a, b in zip(got, expected, strict=True):
        assert a == pytest.approx(b, rel=rel)


def test_history_is_the_same_alone_fused_and_resumed(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = _history_job(tiny_base, datasets)
    alone = Engine(str(tiny_base), device="cpu")
    alone.add_job(config)
    results, finished = _run(alone)
    expected = finished["h"].history.entries

    assert [(e["step"], "eval_loss" in e) for e in expected] == [
        (3, False), (4, True), (6, False), (7, False), (7, True),
    ]  # fmt: skip
    # Each train entry's loss is the mean of the round losses since the last one.
    losses = [r.loss for r in results]
    train = [e for e in expected if "loss" in e]
    for entry, window in zip(train, [losses[0:3], losses[3:6], losses[6:7]], strict=True):
        assert entry["loss"] == pytest.approx(sum(window) / len(window), rel=1e-12)
    assert [e for r in results for e in r.history] == expected  # as rounds reported them
    assert train[-1]["num_input_tokens_seen"] == finished["h"].tokens_seen

    fused = Engine(str(tiny_base), device="cpu")
    fused.add_job(config)
    fused.add_job(job("other", tiny_base, datasets["messages"], AdapterSpec(r=4), max_steps=9))
    _assert_close(_run(fused)[1]["h"].history.entries, expected, rel=1e-5)

    first = Engine(str(tiny_base), device="cpu")
    first.add_job(config)
    _run(first, rounds=5)  # mid logging window: step 5's loss is pending in the checkpoint
    save_checkpoint(first.jobs["h"], tmp_path / "ckpt")
    resumed = Engine(str(tiny_base), device="cpu")
    resumed.add_job(config, resume_from=tmp_path / "ckpt")
    assert resumed.jobs["h"].step == 5
    _assert_close(_run(resumed)[1]["h"].history.entries, expected, rel=1e-6)


def test_exported_trainer_state_reads_as_hf_trainer_state(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(_history_job(tiny_base, datasets))
    outputs = LocalOutputs(tmp_path / "adapters")
    while engine.active_jobs():
        run_round(engine, outputs)
    out = tmp_path / "adapters" / "h"

    state = TrainerState.load_from_json(str(out / "trainer_state.json"))
    assert (state.global_step, state.max_steps, state.logging_steps, state.eval_steps) == (
        7,
        7,
        3,
        4,
    )
    assert state.epoch == pytest.approx(7 * 4 / 40)  # 7 steps of 4 rows over 40 rows
    assert [e["step"] for e in state.log_history] == [3, 4, 6, 7, 7]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "step"} <= state.log_history[0].keys()
    assert read_log_history(out) == state.log_history
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # PEFT files too
