"""Layer-wise ranks: `rank_pattern` and `alpha_pattern` give modules their own r and alpha.

Keys match as PEFT matches them; fused training with them equals PEFT's own
single-job loop with the same LoraConfig on every adapter-math path; the export
loads in PEFT with each module's own shape; init_from reads them back; a key
that selects no targeted module is a validation problem; a patterned job ends
the same resumed from a checkpoint and split across two ranks.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from carpool.orchestrator.control.controller import adapter_memory_bytes
from carpool.orchestrator.spec_check.validation import check_spec
from carpool.workers.base.base_model import linear_module_shapes
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.spec.lora_patterns import pattern_value, unmatched_keys
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_job import TrainingJob
from peft import PeftModel
from peft.utils.other import get_pattern_key
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import STEPS, job, randomize_b
from tests.helpers.peft_reference import (
    max_relative_difference,
    save_peft_adapter,
)
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import assert_each_matches_peft, train_fused, train_one_way

DOWN0, DOWN1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
# The first key that matches wins: layer 0's down_proj takes 12, layer 1's takes 6.
RANKS = {r"layers\.0\.mlp\.down_proj": 12, "down_proj": 6, "v_proj": 2}
ALPHAS = {"self_attn.q_proj": 4, r"layers\.1\.mlp\..*": 3.5}


def patterned(**extra: object) -> AdapterSpec:
    fields = dict(r=4, lora_alpha=8, target_modules="all-linear")
    return AdapterSpec(**{**fields, **extra}, rank_pattern=RANKS, alpha_pattern=ALPHAS)


@pytest.mark.parametrize(
    "module",
    [DOWN0, DOWN1, Q0, Q1, "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.v_proj"],
)
def test_keys_match_as_peft_matches_them(module: str) -> None:
    for pattern in (RANKS, ALPHAS):
        key = get_pattern_key(pattern.keys(), module)
        assert pattern_value(pattern, module, None) == pattern.get(key), (pattern, module)


def test_unmatched_keys_are_the_ones_selecting_no_module() -> None:
    modules = [DOWN0, Q0]
    assert unmatched_keys(["down_proj", "mlp.dwn_proj", "q_proj", "proj"], modules) == [
        "mlp.dwn_proj",
        "proj",  # a whole dotted part, not a substring
    ]


def test_per_module_rank_and_scaling_of_a_spec() -> None:
    a = patterned()
    assert [a.rank_of(m) for m in (DOWN0, DOWN1, Q0)] == [12, 6, 4]
    assert a.scaling_of(Q0) == 4 / 4 and a.scaling_of(DOWN1) == 3.5 / 6
    assert patterned(use_rslora=True).scaling_of(DOWN0) == pytest.approx(8 / 12**0.5)


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("rank_pattern", {"down_proj": 0}, "'down_proj' must map to a whole number >= 1"),
        ("rank_pattern", {"down_proj": 2.5}, "whole number"),
        ("rank_pattern", {"(down": 4}, "not a valid regular expression"),
        ("rank_pattern", ["down_proj"], "must be a mapping"),
        ("alpha_pattern", {"q_proj": -1}, "'q_proj' must map to a number > 0"),
        ("alpha_pattern", {"q_proj": True}, "number > 0"),
    ],
)
def test_bad_patterns_are_refused_by_the_schema(field: str, value: object, text: str) -> None:
    with pytest.raises(ValidationError, match=text) as caught:
        AdapterSpec(**{field: value})
    assert caught.value.errors()[0]["loc"] == (field,)


def fused_jobs(base: Path, datasets: dict[str, Path]):
    return [
        job("plain", base, datasets["text"], AdapterSpec(r=4, lora_alpha=8), max_seq_length=24),
        job("layered", base, datasets["prompt_completion"], patterned(), batch_size=3),
        job(
            "rslora",
            base,
            datasets["messages"],
            patterned(use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
            batch_size=2,
            learning_rate=1e-2,
        ),
    ]


def test_fused_layer_ranks_match_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = fused_jobs(tiny_base, datasets)
    fused = train_fused(tiny_base, configs, adapter_math=adapter_math)
    layered = fused.finished["layered"].adapter.modules
    assert layered[DOWN0].lora_A.shape[0] == 12 and layered[DOWN1].lora_B.shape[1] == 6
    assert_each_matches_peft(fused, STEPS)


def test_export_loads_in_peft_with_each_modules_shape_and_the_same_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    config = job("layered", tiny_base, datasets["text"], patterned(), max_steps=2)
    engine.add_job(config)
    randomize_b(engine, "layered", seed=3)
    while engine.active_jobs():  # the engine's rounds alone: the job stays, for its logits
        engine.train_round()
    out = engine.export("layered", tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    inner = peft_model.base_model.model
    for module, rank in ((DOWN0, 12), (DOWN1, 6), (Q0, 4), ("model.layers.0.self_attn.v_proj", 2)):
        layer = inner.get_submodule(module)
        assert layer.lora_A["default"].weight.shape[0] == rank, module
        assert layer.scaling["default"] == config.adapter.scaling_of(module), module
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(engine.logits("layered", ids), expected, rtol=1e-5, atol=1e-5)
    # Continuing from the export with the spec's own patterns agrees with the adapter.
    again = config.adapter.model_copy(update={"init_from": out})
    assert check_spec(config.model_copy(update={"adapter": again}), "again.yaml") == []


def test_patterns_whose_order_does_not_matter_are_exported_as_written(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT saves its config with sorted keys: RANKS' order matters there, these' does not."""
    adapter = AdapterSpec(
        target_modules="all-linear", rank_pattern={"q_proj": 2}, alpha_pattern={"mlp.up_proj": 3}
    )
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(job("plain", tiny_base, datasets["text"], adapter, max_steps=1))
    out = engine.export("plain", tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"q_proj": 2}
    assert config["alpha_pattern"] == {"mlp.up_proj": 3}


def test_init_from_a_patterned_peft_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ranks = {r"layers\.0\.mlp\.down_proj": 12, r"layers\.1\.mlp\.down_proj": 6}
    saved = save_peft_adapter(
        tiny_base, tmp_path / "init", **lora, rank_pattern=ranks, alpha_pattern=ALPHAS
    )
    spec = job(
        "cont",
        tiny_base,
        datasets["text"],
        AdapterSpec(**lora, init_from=saved),  # patterns left out: taken from the adapter
        max_steps=2,
    )
    raw = spec.model_dump(mode="json", exclude_unset=True)  # as written: no patterns
    assert check_spec(raw, "cont.yaml") == []
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(spec)
    modules = engine.jobs["cont"].adapter.modules
    assert modules[DOWN0].lora_A.shape[0] == 12 and modules[DOWN1].lora_A.shape[0] == 6
    assert modules[Q1].scaling == 4 / 4 and modules[DOWN1].scaling == 3.5 / 6
    # A spec whose pattern says otherwise conflicts with the adapter.
    raw["adapter"]["rank_pattern"] = {"down_proj": 6}
    problems = check_spec(raw, "other.yaml")
    assert [p.field for p in problems] == ["adapter.rank_pattern"], problems
    assert "conflicts with init_from's rank_pattern" in problems[0].message


def test_a_peft_adapter_whose_saved_patterns_resolve_otherwise_is_refused(
    tiny_base: Path, tmp_path: Path
) -> None:
    """PEFT trains RANKS in their order but saves them sorted, so `down_proj` then wins for
    layer 0 too: PEFT itself cannot load the result, and neither does init_from."""
    lora = dict(r=4, lora_alpha=8, target_modules=["down_proj"], rank_pattern=RANKS)
    saved = save_peft_adapter(tiny_base, tmp_path / "init", **lora)
    spec = job("cont", tiny_base, tmp_path / "unused.jsonl", AdapterSpec(init_from=saved))
    messages = [p.message for p in check_spec(spec, "cont.yaml") if p.field == "adapter.init_from"]
    assert messages == [
        f"{DOWN0}: lora_A is 12x128 and lora_B is 64x12 but its config gives it r=6"
    ]


def test_a_key_matching_no_targeted_module_is_reported_with_the_rest(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    spec = job("typo", tiny_base, datasets["text"], AdapterSpec()).model_dump(mode="json")
    spec["adapter"].update(
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"mlp.dwn_proj": 8, "q_proj": 80},  # a typo; a rank over 64
        alpha_pattern={"down_proj": 4},  # a real module, but not a targeted one
        lora_dropout=2,
    )
    found = {(p.field, p.message) for p in check_spec(spec, "typo.yaml")}
    fields = sorted(f for f, _ in found)
    assert fields == [
        "adapter.alpha_pattern",
        "adapter.lora_dropout",
        "adapter.rank_pattern",
        "adapter.rank_pattern",
    ], found
    messages = " | ".join(m for _, m in found)
    assert "'mlp.dwn_proj' matches no targeted module" in messages
    assert "'down_proj' matches no targeted module" in messages
    assert "q_proj (r=80, 64x64)" in messages


def test_the_size_estimate_follows_each_modules_rank(tiny_base: Path) -> None:
    shapes = linear_module_shapes(str(tiny_base))
    plain = AdapterSpec(r=4, target_modules=["down_proj"])
    wider = plain.model_copy(update={"rank_pattern": {r"layers\.0\.mlp\.down_proj": 12}})
    per_rank = adapter_memory_bytes(plain, shapes) // 8  # two modules of rank 4
    assert adapter_memory_bytes(wider, shapes) == per_rank * (12 + 4)


def layered_job(base: Path, data: Path, **training: object):
    """Dropout on: the resumed and split runs must draw the same masks as the straight one."""
    return job("layered", base, data, patterned(lora_dropout=0.1), **training)


def test_resumed_from_a_checkpoint_ends_as_the_straight_run(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = layered_job(tiny_base, datasets["messages"], max_steps=4, batch_size=3)

    def check_resumed(job: TrainingJob) -> None:
        assert job.step == 2
        resumed = job.adapter.modules
        assert resumed[DOWN0].lora_A.shape[0] == 12 and resumed[DOWN1].lora_B.shape[1] == 6

    train = partial(
        train_one_way,
        tiny_base,
        config,
        perturb=randomize_b,
        checkpoint=tmp_path / "ckpt",
        check_resumed=check_resumed,
    )
    straight = train()
    assert max_relative_difference(straight.start, straight.tensors) > 1e-3
    assert max_relative_difference(straight.tensors, train(resume_after=2).tensors) <= 1e-6


@pytest.mark.integration
def test_two_ranks_equal_one(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    """Modules of different r and alpha all-reduce their own gradients (float64, as
    test_data_parallel: the split changes only the summation order)."""
    configs = [
        layered_job(tiny_base, datasets["messages"], max_steps=3, batch_size=5),
        job("plain", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=3),
    ]
    prepare = partial(randomize_b, name="layered", seed=0)
    ranks = [r["layered"] for r in train_on_two_ranks(tiny_base, configs, tmp_path, prepare)]
    expected = train_on_one_rank(tiny_base, configs, prepare)["layered"]
    assert expected[f"{DOWN0}.lora_A"].shape[0] == 12
    assert expected[f"{DOWN1}.lora_B"].shape[1] == 6
    assert max_relative_difference(expected, ranks[0]) <= 1e-9
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)
