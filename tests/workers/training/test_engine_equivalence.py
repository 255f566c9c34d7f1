"""The correctness invariant: a job's adapter depends only on its spec and data.

Fused training must give what a plain single-job PEFT loop gives, and must not
change with the job's neighbours or with how its step is split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from carpool.workers.data.fused_batch import plan_micro_batches, step_rows
from carpool.workers.spec.job_spec import AdapterSpec, JobSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import STEPS, changed, job, three_jobs
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import KeepFinished, train_to_end
from tests.helpers.variants import assert_each_matches_peft, train_fused


def test_fused_jobs_match_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = three_jobs(tiny_base, datasets)
    fused = train_fused(tiny_base, configs, adapter_math=adapter_math)
    assert all(fused.finished[c.name].step == STEPS for c in configs)
    assert_each_matches_peft(fused, STEPS)


def train_alone_and_with(
    base: Path, target: JobSpec, neighbours: list[JobSpec], **engine_kwargs
) -> dict[str, torch.Tensor]:
    engine = Engine(str(base), device="cpu", **engine_kwargs)
    for config in [*neighbours[:2], target, *neighbours[2:]]:
        engine.add_job(config)
    return train_to_end(engine)[target.name].adapter.named_tensors()


def test_adapter_does_not_depend_on_neighbours_or_micro_batches(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    target = job(
        "target",
        tiny_base,
        datasets["prompt_completion"],
        AdapterSpec(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
        batch_size=8,
        shuffle=True,
        seed=7,
        max_steps=6,
    )
    others = [
        job(
            f"other{i}",
            tiny_base,
            datasets[fmt],
            AdapterSpec(r=2 + i, target_modules=["q_proj", "k_proj", "up_proj"][: 1 + i % 3]),
            batch_size=1 + i,
            learning_rate=1e-2 * (i + 1),
            max_seq_length=20 + 9 * i,
            max_steps=3 + i,
        )
        for i, fmt in enumerate(["text", "messages", "prompt_completion", "text", "messages"])
    ]
    alone = train_alone_and_with(tiny_base, target, [], adapter_math=adapter_math)
    with_five = train_alone_and_with(tiny_base, target, others, adapter_math=adapter_math)
    # Two of the target's longest rows per micro-batch: its 8-row step runs as four.
    budget = two_row_budget(tiny_base, target)
    split = train_alone_and_with(
        tiny_base, target, [], micro_batch_tokens=budget, adapter_math=adapter_math
    )
    # Float tolerance: padding and split change summation order, and Adam's
    # normalisation magnifies differences of near-zero gradients.
    assert max_relative_difference(alone, with_five) <= 1e-4
    assert max_relative_difference(alone, split) <= 1e-4


def two_row_budget(base: Path, config: JobSpec) -> int:
    engine = Engine(str(base), device="cpu")
    training_job = engine.add_job(config)
    longest = max(
        len(training_job.row_at(i).input_ids) for i in range(len(training_job.dataset.rows))
    )
    return 2 * longest


def test_micro_batch_budget_really_splits_the_step(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    config = job("t", tiny_base, datasets["prompt_completion"], AdapterSpec(), batch_size=8)
    engine = Engine(
        str(tiny_base), device="cpu", micro_batch_tokens=two_row_budget(tiny_base, config)
    )
    training_job = engine.add_job(config)
    rows, ids = training_job.next_rows()
    micro = plan_micro_batches(step_rows("t", rows, ids), engine.micro_batch_tokens)
    assert [len(m) for m in micro] == [2, 2, 2, 2]


def test_base_weights_are_bitwise_unchanged(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    engine = Engine(str(tiny_base), device="cpu", adapter_math=adapter_math)
    before = {k: v.clone() for k, v in engine.base.state_dict().items()}
    for config in three_jobs(tiny_base, datasets):
        engine.add_job(changed(config, training={"max_steps": 3}))
    train_to_end(engine)
    after = engine.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in engine.base.parameters())


def test_jobs_join_and_leave_between_steps_without_disturbing_others(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = three_jobs(tiny_base, datasets)
    alone = Engine(str(tiny_base), device="cpu")  # the reference loop
    alone.add_job(configs[0])
    expected = train_to_end(alone)[configs[0].name].adapter.named_tensors()

    engine = Engine(str(tiny_base), device="cpu", adapter_math=adapter_math)
    base_before = engine.base
    engine.add_job(configs[0])
    engine.add_job(configs[1])
    finished = KeepFinished()
    train_to_end(engine, finished, max_rounds=3)
    engine.add_job(configs[2])  # joins mid-run
    train_to_end(engine, finished, max_rounds=3)
    engine.remove_job(configs[1].name)  # leaves mid-run
    train_to_end(engine, finished)
    assert engine.base is base_before
    assert finished.jobs[configs[2].name].step == STEPS
    got = finished.jobs[configs[0].name].adapter.named_tensors()
    assert max_relative_difference(expected, got) <= 1e-4
