"""`carpool eval` of a DyLoRA adapter: one fused pass, a row per exported rank, each what
that rank's directory scores alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import job, randomize_b


@pytest.fixture(scope="module")
def dylora_dir(tiny_base: Path, datasets: dict[str, Path], tmp_path_factory) -> Path:
    spec = AdapterSpec(peft_type="DYLORA", r=4, lora_alpha=8, export_ranks=[1, 2, 4])
    config = job("dy", tiny_base, datasets["text"], spec, max_steps=3, learning_rate=1e-2)
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    randomize_b(engine, "dy", seed=0)  # the ranks' losses then differ from the first step
    while engine.active_jobs():
        engine.train_round()
    return engine.export("dy", tmp_path_factory.mktemp("dylora") / "dy")


def evaluate(capsys, *args: str) -> dict[str, float]:
    assert main(["eval", *args, "--json"]) == 0
    return {r["adapter"]: r["eval_loss"] for r in json.loads(capsys.readouterr().out)}


def test_each_exported_rank_is_a_row_scored_as_its_directory_alone(
    dylora_dir: Path, tiny_base: Path, datasets: dict[str, Path], capsys
) -> None:
    common = ["--base", str(tiny_base), "--dataset", str(datasets["text"])]
    rows = evaluate(capsys, str(dylora_dir), *common)
    assert set(rows) == {"dy", "dy@rank-2", "dy@rank-1"}
    for name, where in (("dy@rank-2", "rank-2"), ("dy@rank-1", "rank-1")):
        alone = evaluate(capsys, f"{name.replace('@', '-')}={dylora_dir / where}", *common)
        assert rows[name] == pytest.approx(next(iter(alone.values())), rel=1e-6)
    assert len(set(rows.values())) == 3  # the ranks are different adapters
