"""What the adapter-variant tests share: fused jobs against PEFT's single-job loop, and one
job trained alone, beside others, split into micro-batches or resumed from a checkpoint.

Every engine here is on the CPU. `perturb(engine, name, seed=...)` moves a job off its
start (e.g. `randomize_b`) and returns that start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from carpool.workers.spec.job_spec import JobSpec
from carpool.workers.training.checkpoint import save_checkpoint
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_job import TrainingJob

from tests.helpers.jobs import randomize_b
from tests.helpers.peft_reference import max_relative_difference, train_reference
from tests.helpers.round_driver import train_to_end

Tensors = dict[str, torch.Tensor]
Perturb = Callable[..., Tensors]
Measure = Callable[[Tensors, Tensors], float]  # a difference of two adapters


@dataclass
class Fused:
    base: Path
    configs: list[JobSpec]
    engine: Engine
    starts: dict[str, Tensors]
    finished: dict[str, TrainingJob]


def train_fused(
    base: Path, configs: list[JobSpec], perturb: Perturb = randomize_b, **engine_kwargs: object
) -> Fused:
    """`configs` on one engine, job i started by `perturb(engine, name, seed=i)`, trained
    to the end."""
    engine = Engine(str(base), device="cpu", **engine_kwargs)
    starts = {}
    for i, config in enumerate(configs):
        engine.add_job(config)
        starts[config.name] = perturb(engine, config.name, seed=i)
    return Fused(base, configs, engine, starts, train_to_end(engine))


def assert_each_matches_peft(
    fused: Fused,
    steps: int,
    *,
    within: float = 1e-4,
    moved: float | None = 1e-3,
    measure: Measure = max_relative_difference,
) -> None:
    """Each job's adapter is within `within` of PEFT's single-job loop from the same start
    and rows, and (unless `moved` is None) more than `moved` from its start: the comparison
    is not of two untouched starts. Both are taken by `measure`."""
    pad = fused.engine.tokenizer.pad_token_id
    for config in fused.configs:
        finished = fused.finished[config.name]
        start = fused.starts[config.name]
        rows = list(finished.dataset.rows)
        expected = train_reference(fused.base, config, rows, start, steps, pad)
        got = finished.adapter.named_tensors()
        assert measure(expected, got) <= within, config.name
        if moved is not None:
            assert measure(start, got) > moved, config.name


class Trained(NamedTuple):
    start: Tensors | None
    tensors: Tensors
    job: TrainingJob


def train_one_way(
    base: Path,
    config: JobSpec,
    *,
    perturb: Perturb | None = None,
    beside: Sequence[JobSpec] = (),
    resume_after: int | None = None,
    checkpoint: Path | None = None,
    check_resumed: Callable[[TrainingJob], None] | None = None,
    **engine_kwargs: object,
) -> Trained:
    """`config` trained to the end: started by `perturb(engine, name, seed=0)`, then the
    `beside` jobs added. With `resume_after`, that many rounds, a checkpoint at
    `checkpoint`, and the rest on a fresh engine of the same settings that resumed the job
    from it; `check_resumed` asserts what it expects of the resumed job before it trains on."""
    engine = Engine(str(base), device="cpu", **engine_kwargs)
    engine.add_job(config)
    start = perturb(engine, config.name, seed=0) if perturb is not None else None
    for other in beside:
        engine.add_job(other)
    if resume_after is not None:
        assert checkpoint is not None, "resume_after needs a checkpoint path"
        train_to_end(engine, max_rounds=resume_after)
        save_checkpoint(engine.jobs[config.name], checkpoint)
        engine = Engine(str(base), device="cpu", **engine_kwargs)
        engine.add_job(config, resume_from=checkpoint)
        if check_resumed is not None:
            check_resumed(engine.jobs[config.name])
    job = train_to_end(engine)[config.name]
    return Trained(start, job.adapter.named_tensors(), job)
