"""DoRA (`use_dora: true`): a trained magnitude per output channel of each adapted module.

The norm math equals the full-size form; fused training of a DoRA job beside a
plain LoRA job equals PEFT's own single-job DoRA loop on every adapter-math
path; a DoRA job alone, beside others, split into micro-batches and resumed
from a checkpoint ends the same; the export loads in PEFT with the same logits
and starts a job again through init_from.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from carpool.orchestrator.control.admission import admission_problems
from carpool.orchestrator.control.controller import adapter_memory_bytes
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.spec_check.validation import check_spec
from carpool.workers.base.base_model import linear_module_shapes
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.spec.job_spec import AdapterSpec, JobInputError, JobSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_job import TrainingJob, build_optimizer
from carpool.workers.variants.dora import base_row_norms_sq, weight_norm
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import STEPS, job, randomize_b
from tests.helpers.peft_reference import (
    max_relative_difference,
    peft_model_with,
    save_peft_adapter,
    train_reference,
)
from tests.helpers.round_driver import train_to_end
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import assert_each_matches_peft, train_fused, train_one_way

MAGNITUDE = "lora_magnitude_vector"
DORA = dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True)


def dora_job(base: Path, data: Path, name: str = "dora", **training: object) -> JobSpec:
    targets = ["q_proj", "v_proj", "down_proj"]
    return job(name, base, data, AdapterSpec(**DORA, target_modules=targets), **training)


def perturb(engine: Engine, name: str, seed: int) -> dict[str, torch.Tensor]:
    """B non-zero and the magnitudes moved off ||W_i||: step 1 exercises every term."""
    start = randomize_b(engine, name, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for key, tensor in start.items():
        if key.endswith(MAGNITUDE):
            start[key] = tensor * (1 + 0.1 * torch.randn(tensor.shape, generator=gen))
    engine.jobs[name].adapter.load_tensors(start)
    return start


def test_weight_norm_equals_the_full_size_form() -> None:
    gen = torch.Generator().manual_seed(0)
    w, a, b = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((24, 16), (3, 16), (24, 3))
    )
    expected = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    got = weight_norm(w, base_row_norms_sq(w, torch.float64), a, b, 0.7)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


def test_magnitude_starts_as_peft_and_goes_with_b_under_loraplus(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    config = dora_job(tiny_base, datasets["text"])
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    ours = engine.jobs["dora"].adapter.named_tensors()
    peft = peft_model_with(tiny_base, config, {k: v for k, v in ours.items() if MAGNITUDE not in k})
    layer = peft.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    key = f"model.layers.0.self_attn.q_proj.{MAGNITUDE}"
    torch.testing.assert_close(ours[key], layer.lora_magnitude_vector["default"].weight)
    plus = config.model_copy(
        update={"adapter": config.adapter.model_copy(update={"loraplus_lr_ratio": 4.0})}
    )
    groups = build_optimizer(engine.jobs["dora"].adapter, plus).param_groups
    assert [len(g["params"]) for g in groups] == [6, 12]  # A; B and the magnitudes
    assert groups[1]["lr"] == 4 * groups[0]["lr"]
    assert [p.ndim for p in groups[0]["params"]] == [2] * 6
    assert sorted(p.ndim for p in groups[1]["params"]) == [1] * 6 + [2] * 6


def test_size_estimate_counts_the_magnitudes(tiny_base: Path) -> None:
    shapes = linear_module_shapes(str(tiny_base))
    dora = AdapterSpec(**DORA, target_modules=["q_proj"])
    plain = dora.model_copy(update={"use_dora": False})
    outputs = sum(out for name, (_, out) in shapes.items() if name.endswith("q_proj"))
    extra = adapter_memory_bytes(dora, shapes) - adapter_memory_bytes(plain, shapes)
    assert extra == outputs * 4 * 4  # float32 weight, gradient and AdamW's two moments


def test_fused_dora_beside_lora_matches_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = [
        dora_job(tiny_base, datasets["prompt_completion"], batch_size=3),
        job(
            "plain", tiny_base, datasets["text"], AdapterSpec(r=4, lora_alpha=8), max_seq_length=24
        ),
    ]
    fused = train_fused(tiny_base, configs, perturb, adapter_math=adapter_math)
    assert_each_matches_peft(fused, STEPS)


def test_alone_beside_others_split_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """With dropout, whose DoRA term recomputes W x' on the masked rows."""
    config = dora_job(tiny_base, datasets["messages"], max_steps=6, batch_size=3)
    config = config.model_copy(
        update={"adapter": config.adapter.model_copy(update={"lora_dropout": 0.2})}
    )
    other = job("other", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=6)

    def check_resumed(job: TrainingJob) -> None:
        assert job.step == 3

    train = partial(
        train_one_way,
        tiny_base,
        config,
        perturb=perturb,
        checkpoint=tmp_path / "ckpt",
        check_resumed=check_resumed,
        adapter_math="loop",
    )

    alone = train()
    assert max_relative_difference(alone.start, alone.tensors) > 1e-3
    ways = (
        dict(beside=[other]),
        dict(micro_batch_tokens=40),
        dict(resume_after=3),
        dict(batch_layout="padded"),  # the rest run packed on this base
        dict(beside=[other], adapter_math="bmm"),  # a DoRA job with dropout: by segment
    )
    for way in ways:
        assert max_relative_difference(alone.tensors, train(**way).tensors) <= 1e-6, way


def test_export_loads_in_peft_with_the_same_logits_and_starts_again(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = dora_job(tiny_base, datasets["text"], max_steps=2)
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    perturb(engine, "dora", seed=3)
    while engine.active_jobs():  # the engine's rounds alone: the job stays, for its logits
        engine.train_round()
    out = engine.export("dora", tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert f"base_model.model.model.layers.0.self_attn.q_proj.{MAGNITUDE}" in saved
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(engine.logits("dora", ids), expected, rtol=1e-5, atol=1e-5)

    again = config.model_copy(
        update={"name": "again", "adapter": config.adapter.model_copy(update={"init_from": out})}
    )
    assert check_spec(again, "again.yaml") == []
    engine.add_job(again)
    torch.testing.assert_close(engine.logits("again", ids), expected, rtol=1e-5, atol=1e-5)


def test_init_from_checks_use_dora_against_the_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    dora = save_peft_adapter(tiny_base, tmp_path / "dora", **lora, use_dora=True)
    plain = save_peft_adapter(tiny_base, tmp_path / "plain", **lora)
    spec = job("cont", tiny_base, datasets["text"], AdapterSpec(**lora, init_from=dora))
    raw = spec.model_dump(mode="json", exclude_unset=True)  # use_dora left out: taken
    assert check_spec(raw, "cont.yaml") == []
    raw["adapter"].update(init_from=str(plain), use_dora=True)
    problems = check_spec(raw, "other.yaml")
    assert [p.field for p in problems] == ["adapter.use_dora"], problems
    assert "conflicts with init_from's use_dora false" in problems[0].message


def test_bad_use_dora_names_the_field_and_zero3_refuses_it(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    with pytest.raises(ValidationError) as caught:
        AdapterSpec(use_dora="sometimes")
    assert caught.value.errors()[0]["loc"] == ("use_dora",)
    spec = dora_job(tiny_base, datasets["text"])
    problems = admission_problems(spec, OperatorConfig(zero_stage=3), "job.yaml")
    assert [(p.field, "zero_stage 3" in p.message) for p in problems] == [
        ("adapter.use_dora", True)
    ]
    assert admission_problems(spec, OperatorConfig(zero_stage=0), "job.yaml") == []
    engine = Engine(str(tiny_base), device="cpu")
    engine.zero_stage = 3  # as a partitioned engine; admission reads only this
    with pytest.raises(JobInputError, match="use_dora: DoRA is not supported .* ZeRO-3"):
        engine.add_job(spec)


@pytest.mark.integration
def test_two_ranks_equal_one(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    """The magnitudes' gradients are all-reduced with A's and B's (float64, as
    test_data_parallel: the split changes only the summation order)."""
    dora = dora_job(tiny_base, datasets["messages"], max_steps=3, batch_size=5)
    dora = dora.model_copy(
        update={"adapter": dora.adapter.model_copy(update={"lora_dropout": 0.1})}
    )
    configs = [dora, job("plain", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=3)]
    ranks = [r["dora"] for r in train_on_two_ranks(tiny_base, configs, tmp_path)]
    expected = train_on_one_rank(tiny_base, configs)["dora"]
    assert max_relative_difference(expected, ranks[0]) <= 1e-9
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)


def test_conv1d_targets_of_gpt2_match_single_job_peft(
    datasets: dict[str, Path], tmp_path: Path
) -> None:
    """GPT-2 stores its weights [in, out] (Conv1D): the norm is still per output channel."""
    base = build_tiny_base(tmp_path / "gpt2", family="gpt2", hidden_size=32, intermediate_size=64)
    adapter = AdapterSpec(**DORA, target_modules=["c_attn", "c_fc"])
    config = job("dora", base, datasets["text"], adapter, max_steps=4, max_seq_length=24)
    engine = Engine(str(base), device="cpu")
    engine.add_job(config)
    start = perturb(engine, "dora", seed=1)
    finished = train_to_end(engine)
    rows = list(finished["dora"].dataset.rows)
    expected = train_reference(base, config, rows, start, 4, engine.tokenizer.pad_token_id)
    assert max_relative_difference(expected, finished["dora"].adapter.named_tensors()) <= 1e-4
