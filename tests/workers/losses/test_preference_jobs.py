"""Preference jobs in the fused batch: a job's adapter depends only on its spec and pairs.

Alone, beside supervised and other preference jobs, split into micro-batches, packed or
padded, resumed from a checkpoint and on two ranks, a DPO job ends with the same adapter
(float64, 1e-9), and so do the reference-free ones (CPO, ORPO: their chosen rows'
cross-entropy is normalized over the whole step). The reference log-probs come from one
no-grad, base-only forward per micro-batch that holds DPO rows, shared by every DPO job in
it; the reference-free objectives cause none.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from carpool.workers.data.fused_batch import collate, step_rows
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec
from carpool.workers.spec.objective import OBJECTIVE_MODELS, SftObjective
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import changed, job
from tests.helpers.peft_reference import max_relative_difference, save_peft_adapter
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import train_one_way

STEPS = 4


@pytest.fixture
def pairs(datasets: dict[str, Path]) -> Path:
    return datasets["preference"]


def dpo(name: str, base: Path, data: Path, **objective: object):
    return preference(name, base, data, "dpo", **objective)


def preference(name: str, base: Path, data: Path, kind: str, **objective: object):
    config = job(
        name,
        base,
        data,
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        batch_size=3,
        learning_rate=2e-2,
        max_steps=STEPS,
        max_seq_length=32,
    )
    return changed(config, objective=OBJECTIVE_MODELS[kind](type=kind, **objective))


def supervised(base: Path, datasets: dict[str, Path]):
    return job(
        "sft",
        base,
        datasets["text"],
        AdapterSpec(r=8, lora_alpha=16, target_modules="all-linear"),
        max_steps=STEPS,
    )


def test_a_dpo_job_alone_beside_others_split_packed_and_resumed_agree(
    tiny_base: Path, pairs: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = dpo("dpo", tiny_base, pairs, beta=0.3)
    others = [supervised(tiny_base, datasets), dpo("ipo", tiny_base, pairs, loss_type="ipo")]
    f64 = {"dtype": torch.float64}
    first = train_one_way(tiny_base, config, batch_layout="padded", **f64)
    alone = first.tensors
    ways = {
        "beside": train_one_way(tiny_base, config, beside=others, batch_layout="padded", **f64),
        "split": train_one_way(
            tiny_base, config, micro_batch_tokens=40, batch_layout="padded", **f64
        ),
        "resumed": train_one_way(
            tiny_base,
            config,
            resume_after=2,
            checkpoint=tmp_path / "ckpt",
            batch_layout="padded",
            **f64,
        ),
    }
    for way, trained in ways.items():
        assert max_relative_difference(alone, trained.tensors) < 1e-9, way
    # The resumed job's history (its rewards included) is the uninterrupted one's.
    resumed = ways["resumed"].job.history.entries
    assert len(resumed) == len(first.job.history.entries)
    for got, want in zip(resumed, first.job.history.entries, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize(("kind", "options"), [("orpo", {}), ("cpo", {"cpo_alpha": 0.5})])
def test_a_reference_free_job_alone_and_split_beside_others_agree(
    kind: str, options: dict, tiny_base: Path, pairs: Path, datasets: dict[str, Path]
) -> None:
    """Its chosen rows' cross-entropy is a mean over the step's chosen tokens (ORPO's over the
    prompt's too): split into micro-batches beside other objectives, the same adapter."""
    config = preference(kind, tiny_base, pairs, kind, beta=0.3, **options)
    others = [
        supervised(tiny_base, datasets),
        dpo("dpo", tiny_base, pairs),
        preference("simpo", tiny_base, pairs, "simpo", beta=2.0),
    ]
    f64 = {"dtype": torch.float64, "batch_layout": "padded"}
    alone = train_one_way(tiny_base, config, **f64).tensors
    split = train_one_way(tiny_base, config, beside=others, micro_batch_tokens=40, **f64)
    assert max_relative_difference(alone, split.tensors) < 1e-9


def test_a_kto_job_alone_beside_others_split_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], pairs: Path, tmp_path: Path
) -> None:
    """Its KL estimate is over the whole step, whatever the micro-batches: split beside other
    objectives, padded or packed, and resumed, the same adapter."""
    config = changed(
        preference("kto", tiny_base, datasets["unpaired"], "kto", beta=0.5),
        # 24 records: a second, reshuffled epoch; every step logged
        training={"batch_size": 6, "max_steps": 5, "logging_steps": 1},
    )
    others = [supervised(tiny_base, datasets), dpo("dpo", tiny_base, pairs)]
    f64 = {"dtype": torch.float64, "batch_layout": "padded"}
    first = train_one_way(tiny_base, config, **f64)
    kls = [e["kl"] for e in first.job.history.entries if "kl" in e]
    assert kls and max(kls) > 0  # the KL term took part
    ways = {
        "split beside": train_one_way(
            tiny_base, config, beside=others, micro_batch_tokens=40, **f64
        ),
        "resumed": train_one_way(
            tiny_base, config, resume_after=2, checkpoint=tmp_path / "ckpt", **f64
        ),
    }
    for way, trained in ways.items():
        assert max_relative_difference(first.tensors, trained.tensors) < 1e-9, way
    packed = train_one_way(tiny_base, config, batch_layout="packed", micro_batch_tokens=40)
    assert max_relative_difference(first.tensors, packed.tensors) < 1e-4


def test_reference_free_jobs_cause_no_reference_pass(tiny_base: Path, pairs: Path) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    for kind in ("simpo", "cpo", "orpo"):
        engine.add_job(preference(kind, tiny_base, pairs, kind))
    reports = engine.train_round()
    assert engine.reference_passes == 0
    assert sorted(engine.bank.adapters) == ["cpo", "orpo", "simpo"]  # no reference row set
    assert reports["orpo"].metrics["nll_loss"] > 0
    assert set(reports["simpo"].metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }


def test_packed_and_split_packed_agree(tiny_base: Path, pairs: Path) -> None:
    """Packed micro-batches (float32: row attention runs there) split or not, to the
    invariant's float32 bar (sums of different lengths round differently)."""
    config = dpo("dpo", tiny_base, pairs, loss_type="hinge")
    whole = train_one_way(tiny_base, config, batch_layout="packed").tensors
    split = train_one_way(tiny_base, config, batch_layout="packed", micro_batch_tokens=40)
    assert max_relative_difference(whole, split.tensors) < 1e-4


def test_one_base_only_reference_pass_per_micro_batch_with_pairs(
    tiny_base: Path, pairs: Path, datasets: dict[str, Path]
) -> None:
    engine = Engine(str(tiny_base), device="cpu", batch_layout="padded")
    engine.add_job(dpo("a", tiny_base, pairs))
    engine.add_job(dpo("b", tiny_base, pairs, beta=0.5))
    engine.train_round()
    assert engine.reference_passes == 1  # both jobs' pairs, one forward
    engine.add_job(supervised(tiny_base, datasets))
    engine.train_round()
    assert engine.reference_passes == 2  # the supervised rows ride without a reference

    alone = Engine(str(tiny_base), device="cpu")
    alone.add_job(supervised(tiny_base, datasets))
    alone.train_round()
    assert alone.reference_passes == 0


def test_the_reference_pass_keeps_nothing_for_backward(tiny_base: Path, pairs: Path) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    job_ = engine.add_job(dpo("a", tiny_base, pairs))
    records, ids = job_.next_rows()
    batch = collate(step_rows("a", records, ids), engine.tokenizer.pad_token_id, engine.device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reference = engine.references.logps(batch, {"a": job_.config.objective}, {})
    assert not saved
    assert len(reference) == 2 * len(records)  # every row of every pair
    # With the adapter's B at zero, the policy is the base: the reference is its log-probs.
    trained = engine.train_round()["a"]
    assert abs(trained.metrics["rewards/margins"]) < 1e-5


@pytest.mark.integration  # two processes
def test_a_dpo_job_on_two_ranks_equals_one_rank(
    tiny_base: Path, pairs: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    configs = [
        dpo("dpo", tiny_base, pairs, beta=0.3),
        supervised(tiny_base, datasets),
        preference("orpo", tiny_base, pairs, "orpo"),  # other figures, reduced by name
        preference("kto", tiny_base, datasets["unpaired"], "kto"),  # its KL over both ranks
    ]
    one = train_on_one_rank(tiny_base, configs)
    for rank in train_on_two_ranks(tiny_base, configs, tmp_path):
        for name in one:
            assert max_relative_difference(one[name], rank[name]) < 1e-9, name


def test_step_metrics_are_each_pairs_mean(tiny_base: Path, pairs: Path) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(dpo("a", tiny_base, pairs, beta=0.5))
    reports = [engine.train_round()["a"] for _ in range(STEPS)]
    for r in reports[1:]:
        m = r.metrics
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])
        assert 0.0 <= m["rewards/accuracies"] <= 1.0
        assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    logged = [e for e in engine.jobs["a"].history.entries if "loss" in e]
    assert logged and all("rewards/margins" in e for e in logged)


def test_a_pair_counts_twice_toward_a_steps_tokens(tiny_base: Path, pairs: Path) -> None:
    """Admission and the scheduler read `tokens_per_step`: a pair is two rows."""
    config = dpo("a", tiny_base, pairs)
    sft = changed(config, objective=SftObjective())
    t = config.training
    assert sft.tokens_per_step == t.batch_size * t.max_seq_length
    assert config.tokens_per_step == 2 * sft.tokens_per_step


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_evaluating_pairs_gives_the_loss_and_figures_the_next_step_trains_on(
    kind: str, tiny_base: Path, pairs: Path
) -> None:
    """Evaluated on its own training pairs (the whole set in one step, no dropout), a job's
    eval loss (ORPO's cross-entropy term included) and eval_rewards/* are what its next step
    reports, before that step updates."""
    config = changed(
        preference("a", tiny_base, pairs, kind, beta=0.5),
        eval_dataset=DatasetSpec(path=pairs),
        training={"batch_size": 12, "shuffle": False, "eval_steps": 1},
    )
    engine = Engine(str(tiny_base), device="cpu", dtype=torch.float64)
    job_ = engine.add_job(config)
    engine.train_round()  # off the reference: the figures are no longer all zero
    evaluated = engine.evaluate()["a"]
    figures = dict(job_.eval_metrics)
    step = engine.train_round()["a"]
    assert evaluated == pytest.approx(step.loss, rel=1e-9)
    for name, value in step.metrics.items():
        assert figures[f"eval_{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert 0 < figures["eval_rewards/accuracies"] <= 1


def test_a_job_started_from_an_adapter_has_that_adapter_frozen_as_its_reference(
    tiny_base: Path, pairs: Path, tmp_path: Path
) -> None:
    """Its first step's loss is ln 2 (the policy is its reference) though the adapter is far
    from the base; the frozen copy never moves, rides in the same one reference pass as a
    fresh job's base reference, and comes back on resume."""
    start = save_peft_adapter(
        tiny_base, tmp_path / "sft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,  # B random: this adapter is not the base
    )  # fmt: skip
    config = changed(dpo("a", tiny_base, pairs, beta=0.5), adapter={"init_from": start})
    engine = Engine(str(tiny_base), device="cpu", dtype=torch.float64)
    engine.add_job(config)
    engine.add_job(dpo("fresh", tiny_base, pairs))
    frozen = {k: v.clone() for k, v in engine.bank.adapters["a@reference"].named_tensors().items()}
    reports = engine.train_round()
    assert reports["a"].loss == pytest.approx(math.log(2), abs=1e-12)
    assert engine.reference_passes == 1  # both jobs' references, one forward
    engine.train_round()
    moved = engine.bank.adapters["a@reference"].named_tensors()
    assert all(torch.equal(frozen[k], moved[k]) for k in frozen)
    assert max_relative_difference(frozen, engine.jobs["a"].adapter.named_tensors()) > 1e-3
    assert reports["a"].metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-9)
    resumed = train_one_way(
        tiny_base, config, resume_after=2, checkpoint=tmp_path / "ckpt", dtype=torch.float64
    )
    straight = train_one_way(tiny_base, config, dtype=torch.float64)
    assert max_relative_difference(straight.tensors, resumed.tensors) < 1e-9
    engine.remove_job("a")
    assert "a@reference" not in engine.bank.adapters


def precomputed(config):
    return changed(
        config,
        objective=config.objective.model_copy(update={"precompute_ref_log_probs": True}),
    )


def test_precomputed_references_train_the_adapter_the_live_reference_trains(
    tiny_base: Path, pairs: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Looked up by record through a reshuffled second epoch, split, beside other jobs and
    after a resume (which finds the kept table), the same adapter as the live reference."""
    live = changed(dpo("dpo", tiny_base, pairs, beta=0.3), training={"max_steps": 6})
    f64 = {"dtype": torch.float64, "batch_layout": "padded"}
    want = train_one_way(tiny_base, live, **f64).tensors
    got = train_one_way(
        tiny_base,
        precomputed(live),
        beside=[supervised(tiny_base, datasets), dpo("other", tiny_base, pairs)],
        resume_after=3,
        checkpoint=tmp_path / "ckpt",
        micro_batch_tokens=40,
        reference_cache_dir=tmp_path / "refs",
        **f64,
    )
    assert got.job.rows_consumed > 12  # the 12 pairs' second epoch, in another order
    assert max_relative_difference(want, got.tensors) < 1e-9


def test_a_precomputed_reference_is_one_pass_kept_for_every_job_on_the_same_data(
    tiny_base: Path, pairs: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "refs"
    config = precomputed(changed(dpo("a", tiny_base, pairs), eval_dataset=DatasetSpec(path=pairs)))
    engine = Engine(str(tiny_base), device="cpu", reference_cache_dir=cache)
    engine.add_job(config)
    assert engine.reference_passes == 1  # the 12 pairs in one micro-batch; eval: the same table
    for _ in range(STEPS):
        engine.train_round()
    live = Engine(str(tiny_base), device="cpu")
    live.add_job(changed(config, objective=dpo("a", tiny_base, pairs).objective))
    for _ in range(STEPS):
        live.train_round()
    assert engine.evaluate() == pytest.approx(live.evaluate(), rel=1e-6)
    assert engine.reference_passes == 1  # none while training or evaluating

    # A beta sweep's next trial, in another process: the table on disk.
    other = Engine(str(tiny_base), device="cpu", reference_cache_dir=cache)
    other.add_job(
        changed(config, name="b", objective=config.objective.model_copy(update={"beta": 0.5}))
    )
    assert other.reference_passes == 0
    # Other tokenization, or another reference: another table.
    other.add_job(changed(config, name="c", training={"max_seq_length": 10}))  # rows cut
    assert other.reference_passes == 1
    start = save_peft_adapter(
        tiny_base, tmp_path / "sft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )  # fmt: skip
    other.add_job(changed(config, name="d", adapter={"init_from": start}))
    assert other.reference_passes == 2
    assert len(list(cache.glob("*.pt"))) == 3


# Trained weights on q_proj (64 -> 64) and v_proj (64 -> 32): LoRA r=4 A and B; VeRA r=16
# lambda_d and lambda_b; AdaLoRA init_r=12 A, E and B.
@pytest.mark.parametrize(
    ("adapter", "trained"),
    [
        (AdapterSpec(r=4), 4 * (64 + 64) + 4 * (64 + 32)),
        (AdapterSpec(peft_type="VERA", r=16), (16 + 64) + (16 + 32)),
        (AdapterSpec(peft_type="ADALORA", total_step=10), 12 * (64 + 1 + 64) + 12 * (64 + 1 + 32)),
    ],
    ids=["lora", "vera", "adalora"],
)
def test_admission_counts_a_frozen_reference_copy_of_the_trained_weights(
    adapter: AdapterSpec, trained: int
) -> None:
    """A preference job started from an adapter holds its trained weights once more,
    frozen (float32, no gradient or optimizer state), whatever its kind."""
    from carpool.orchestrator.control.controller import adapter_memory_bytes

    shapes = {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.self_attn.v_proj": (64, 32),
    }
    alone = adapter_memory_bytes(adapter, shapes)
    assert adapter_memory_bytes(adapter, shapes, frozen_copy=True) - alone == 4 * trained
