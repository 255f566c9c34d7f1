"""`carpool eval --objective` on preference pairs: every adapter fused, against the base
or a `--reference` adapter, with the numbers training's own evaluation gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from carpool.orchestrator.cli.main import main
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec
from carpool.workers.spec.objective import DpoObjective, OrpoObjective
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import changed, job


@pytest.fixture(scope="module")
def trained(tiny_base: Path, datasets: dict[str, Path], tmp_path_factory) -> tuple[Path, float]:
    """A DPO adapter trained 3 steps, exported, and its eval loss as training computes it."""
    pairs = datasets["preference"]
    config = changed(
        job("dpo", tiny_base, pairs, AdapterSpec(r=4, lora_alpha=8), batch_size=4,
            learning_rate=2e-2, max_steps=3, max_seq_length=64),
        objective=DpoObjective(type="dpo", beta=0.5),
        eval_dataset=DatasetSpec(path=pairs),
    )  # fmt: skip
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    for _ in range(3):
        engine.train_round()
    out = engine.export("dpo", tmp_path_factory.mktemp("dpo") / "dpo")
    return out, engine.evaluate()["dpo"]


def run_eval(capsys, *args: str) -> list[dict]:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_pairs_are_scored_against_the_base_as_training_scores_them(
    trained: tuple[Path, float], tiny_base: Path, datasets: dict[str, Path], capsys
) -> None:
    adapter, training_eval = trained
    args = ["--base", str(tiny_base), "--dataset", str(datasets["preference"]),
            "--max-seq-length", "64", "--objective", "{type: dpo, beta: 0.5}"]  # fmt: skip
    rows = {r["adapter"]: r for r in run_eval(capsys, str(adapter), *args, "--include-base")}
    assert rows["dpo"]["eval_loss"] == pytest.approx(training_eval, rel=1e-5)
    assert rows["base"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # it is the reference
    assert rows["dpo"]["eval_rewards/margins"] > 0 and rows["dpo"]["pairs"] == 12
    # Against itself as the reference, the trained adapter is back at ln 2.
    itself = run_eval(capsys, str(adapter), *args, "--reference", str(adapter))
    assert itself[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_reference_free_objective_scores_as_training_scores_it(
    trained: tuple[Path, float], tiny_base: Path, datasets: dict[str, Path], capsys
) -> None:
    """ORPO's eval loss, its chosen rows' cross-entropy included, for the base (a fresh
    adapter) as a training job's evaluation computes it before its first step."""
    pairs = datasets["preference"]
    config = changed(
        job("orpo", tiny_base, pairs, AdapterSpec(r=4, lora_alpha=8), max_steps=1,
            max_seq_length=64),
        objective=OrpoObjective(type="orpo", beta=0.5),
        eval_dataset=DatasetSpec(path=pairs),
    )  # fmt: skip
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    fresh = engine.evaluate()["orpo"]
    adapter, _ = trained
    rows = run_eval(capsys, str(adapter), "--base", str(tiny_base), "--dataset", str(pairs),
                    "--max-seq-length", "64", "--objective", "{type: orpo, beta: 0.5}",
                    "--include-base")  # fmt: skip
    by_name = {r["adapter"]: r for r in rows}
    assert by_name["base"]["eval_loss"] == pytest.approx(fresh, rel=1e-5)
    assert by_name["base"]["eval_nll_loss"] > 0


def test_pair_eval_refusals_name_the_argument(
    trained: tuple[Path, float], tiny_base: Path, datasets: dict[str, Path], capsys
) -> None:
    adapter, _ = trained
    base = ["eval", str(adapter), "--base", str(tiny_base)]
    cases = [
        ([*base, "--dataset", str(datasets["text"]), "--objective", "{type: dpo}"],
         "objective dpo trains on preference data; this dataset's format is text"),
        ([*base, "--dataset", str(datasets["preference"])], "(pass --objective)"),
        ([*base, "--dataset", str(datasets["preference"]), "--reference", str(adapter)],
         "--reference needs --objective"),
        ([*base, "--dataset", str(datasets["preference"]), "--objective", "{type: simpo}",
          "--reference", str(adapter)], "--reference: objective simpo has no reference policy"),
        ([*base, "--dataset", str(datasets["preference"]), "--objective", "{type: kto}"],
          "--objective: type kto scores no pairs"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [*base, "--dataset", str(datasets["preference"]), "--objective", "{type: dpo, beta: 0}"]
        )
    assert "beta" in capsys.readouterr().err
