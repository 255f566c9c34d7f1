"""VeRA (`peft_type: VERA`): shared frozen projections, two trained vectors per module.

The projections equal PEFT's for the same key; fused training of a VeRA job
beside a plain LoRA job equals PEFT's own single-job VeRA loop on every
adapter-math path; a VeRA job alone, beside others, split into micro-batches
and resumed from a checkpoint ends the same; the export loads in PEFT with the
same logits; a job started from that export (`init_from`) begins at its vectors
and continues as PEFT does; schema and validation errors name the field.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from carpool.orchestrator.control.controller import adapter_memory_bytes
from carpool.orchestrator.spec_check.validation import check_spec, validate_files
from carpool.workers.base.base_model import linear_module_shapes
from carpool.workers.spec.job_spec import AdapterSpec, JobInputError, JobSpec, adapter_variant
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_job import TrainingJob
from carpool.workers.variants.vera import LAMBDA_B, LAMBDA_D
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import STEPS, job
from tests.helpers.peft_reference import (
    max_relative_difference,
    peft_model_with,
    save_peft_adapter,
    train_reference,
)
from tests.helpers.round_driver import train_to_end
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import assert_each_matches_peft, train_fused, train_one_way

VERA = dict(peft_type="VERA", r=4, d_initial=0.5, projection_prng_key=7)
TARGETS = ["q_proj", "v_proj", "down_proj"]  # different in and out sizes: slices differ


def vera_job(base: Path, data: Path, name: str = "vera", **training: object) -> JobSpec:
    adapter = AdapterSpec(**VERA, target_modules=TARGETS)
    return job(name, base, data, adapter, learning_rate=2e-2, **training)


def perturb(engine: Engine, name: str, seed: int) -> dict[str, torch.Tensor]:
    """lambda_b off zero (and lambda_d off d_initial): step 1 moves both vectors."""
    adapter = engine.jobs[name].adapter
    gen = torch.Generator().manual_seed(seed)
    start = {}
    for key, tensor in adapter.named_tensors().items():
        if key.endswith("lora_B") or key.endswith(LAMBDA_B):
            tensor = torch.randn(tensor.shape, generator=gen) * 0.05
        elif key.endswith(LAMBDA_D):
            tensor = tensor * (1 + 0.1 * torch.randn(tensor.shape, generator=gen))
        start[key] = tensor.clone()
    adapter.load_tensors(start)
    return start


def test_projections_and_start_equal_peft(tiny_base: Path, datasets: dict[str, Path]) -> None:
    config = vera_job(tiny_base, datasets["text"])
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    ours = engine.jobs["vera"].adapter
    peft = peft_model_with(tiny_base, config, ours.named_tensors())
    torch.testing.assert_close(ours.vera.shared.vera_A, peft.base_model.vera_A["default"])
    torch.testing.assert_close(ours.vera.shared.vera_B, peft.base_model.vera_B["default"])
    layer = peft.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    w = ours.modules["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(w.lambda_d, layer.vera_lambda_d["default"])
    assert float(w.lambda_b.detach().abs().max()) == 0.0
    # A second job with the same key and shapes shares the projections' memory.
    engine.add_job(vera_job(tiny_base, datasets["text"], name="twin"))
    assert engine.jobs["twin"].adapter.vera.shared is ours.vera.shared
    assert len(ours.parameters()) == 2 * 6


def test_size_estimate_counts_vectors_and_projections_once(tiny_base: Path) -> None:
    shapes = linear_module_shapes(str(tiny_base))
    vera = AdapterSpec(peft_type="VERA", r=4, target_modules=["q_proj"])
    lora = AdapterSpec(r=4, target_modules=["q_proj"])
    q = [s for name, s in shapes.items() if name.endswith("q_proj")]
    vectors = sum(4 + out for _, out in q)
    projections = 4 * (max(i for i, _ in q) + max(o for _, o in q))
    assert adapter_memory_bytes(vera, shapes) == vectors * 16 + projections * 4
    assert adapter_memory_bytes(vera, shapes) < adapter_memory_bytes(lora, shapes)


def test_fused_vera_beside_lora_matches_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = [
        vera_job(tiny_base, datasets["prompt_completion"], batch_size=3),
        job(
            "plain", tiny_base, datasets["text"], AdapterSpec(r=4, lora_alpha=8), max_seq_length=24
        ),
    ]
    fused = train_fused(tiny_base, configs, perturb, adapter_math=adapter_math)
    assert_each_matches_peft(fused, STEPS)


def test_alone_beside_others_split_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = vera_job(tiny_base, datasets["messages"], max_steps=6, batch_size=3)
    config = config.model_copy(
        update={"adapter": config.adapter.model_copy(update={"vera_dropout": 0.2})}
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
        dict(beside=[other], adapter_math="bmm"),
    )
    for way in ways:
        assert max_relative_difference(alone.tensors, train(**way).tensors) <= 1e-6, way


@pytest.mark.parametrize("save_projection", [True, False])
def test_export_loads_in_peft_with_the_same_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, save_projection: bool
) -> None:
    config = vera_job(tiny_base, datasets["text"], max_steps=2)
    config = config.model_copy(
        update={"adapter": config.adapter.model_copy(update={"save_projection": save_projection})}
    )
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    perturb(engine, "vera", seed=3)
    while engine.active_jobs():
        engine.train_round()
    out = engine.export("vera", tmp_path / "out")
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "VERA"
    assert saved_config["projection_prng_key"] == 7 and saved_config["d_initial"] == 0.5
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert f"base_model.model.model.layers.0.self_attn.q_proj.{LAMBDA_D}" in saved
    assert ("base_model.vera_A" in saved) is save_projection
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(engine.logits("vera", ids), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_field(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        AdapterSpec(peft_type="IA3")
    assert caught.value.errors()[0]["loc"] == ("peft_type",)
    raw = vera_job(tiny_base, datasets["text"]).model_dump(mode="json", exclude_unset=True)
    assert check_spec(raw, "vera.yaml") == []
    raw["adapter"].update(use_dora=True, rank_pattern={"q_proj": 2}, lora_alpha=4)
    problems = check_spec(raw, "vera.yaml")
    assert sorted(p.field for p in problems) == [
        "adapter.lora_alpha",
        "adapter.rank_pattern",
        "adapter.use_dora",
    ], problems
    assert all("peft_type is VERA" in p.message for p in problems)
    lora = job("plain", tiny_base, datasets["text"], AdapterSpec(r=2))
    raw = lora.model_dump(mode="json", exclude_unset=True)
    raw["adapter"].update(d_initial=0.3, vera_dropout=0.1)
    problems = check_spec(raw, "plain.yaml")
    assert sorted(p.field for p in problems) == ["adapter.d_initial", "adapter.vera_dropout"]
    # Each kind starts only from its own kind's adapter, refused on adapter.init_from.
    lora_dir = save_peft_adapter(tiny_base, tmp_path / "lora", r=2, target_modules=["q_proj"])
    raw = vera_job(tiny_base, datasets["text"]).model_dump(mode="json", exclude_unset=True)
    raw["adapter"]["init_from"] = str(lora_dir)
    problems = check_spec(raw, "vera.yaml")
    assert [p.field for p in problems] == ["adapter.init_from"], problems
    assert "peft_type is 'LORA', not VERA" in problems[0].message
    vera_dir = exported_vera(tiny_base, datasets["text"], tmp_path / "vera")
    raw = lora.model_dump(mode="json", exclude_unset=True)
    raw["adapter"]["init_from"] = str(vera_dir)
    problems = check_spec(raw, "plain.yaml")
    assert [p.field for p in problems] == ["adapter.init_from"], problems
    assert "peft_type is 'VERA', not LORA" in problems[0].message
    engine = Engine(str(tiny_base), device="cpu")
    vera = vera_job(tiny_base, datasets["text"])
    bad = vera.model_copy(
        update={"adapter": vera.adapter.model_copy(update={"init_from": lora_dir})}
    )
    with pytest.raises(JobInputError, match="init_from.*not VERA"):
        engine.add_job(bad)


def exported_vera(base: Path, data: Path, out: Path, **adapter: object) -> Path:
    """A VeRA job trained 2 steps from perturbed vectors, exported."""
    config = vera_job(base, data, max_steps=2)
    config = config.model_copy(update={"adapter": config.adapter.model_copy(update=adapter)})
    engine = Engine(str(base), device="cpu")
    engine.add_job(config)
    perturb(engine, "vera", seed=5)
    while engine.active_jobs():
        engine.train_round()
    return engine.export("vera", out)


def test_init_from_continues_like_peft(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    out = exported_vera(tiny_base, datasets["text"], tmp_path / "out", vera_dropout=0.1)
    # A spec leaving the adapter's fields out takes them, each noted; a differing one is
    # reported on its field.
    raw = job("next", tiny_base, datasets["text"], AdapterSpec(peft_type="VERA"), max_seq_length=24)
    raw = raw.model_dump(mode="json", exclude_unset=True)
    raw["adapter"]["init_from"] = str(out)
    raw["training"]["max_steps"] = 4
    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(raw))
    notes: list = []
    [config] = validate_files([path], notes)
    a = config.adapter
    assert (a.r, a.projection_prng_key, a.d_initial, a.vera_dropout) == (4, 7, 0.5, 0.1)
    assert set(a.target_modules) == set(TARGETS)
    noted = {n.field for n in notes}
    assert {"adapter.r", "adapter.d_initial", "adapter.projection_prng_key"} <= noted, notes
    assert "adapter.vera_dropout" in noted
    conflicting = {**raw, "adapter": {**raw["adapter"], "projection_prng_key": 3, "r": 4}}
    problems = check_spec(conflicting, "next.yaml")
    assert [p.field for p in problems] == ["adapter.projection_prng_key"], problems
    assert "conflicts with init_from's projection_prng_key 7" in problems[0].message
    # Dropout masks are drawn differently from PEFT's: compare without them.
    config = config.model_copy(update={"adapter": a.model_copy(update={"vera_dropout": 0.0})})
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    adapter = engine.jobs["next"].adapter
    saved = load_file(str(out / "adapter_model.safetensors"))
    start = {k: v.clone() for k, v in adapter.named_tensors().items()}
    assert set(start) == {k.removeprefix("base_model.model.") for k in saved if "lambda" in k}
    for key, tensor in start.items():
        assert torch.equal(tensor, saved[f"base_model.model.{key}"]), key
    # The saved projections are the key's: the cached copy is shared, not a second one.
    engine.add_job(vera_job(tiny_base, datasets["text"], name="twin"))
    assert adapter.vera.shared is engine.jobs["twin"].adapter.vera.shared
    engine.remove_job("twin")
    finished = train_to_end(engine)
    rows = list(finished["next"].dataset.rows)
    expected = train_reference(tiny_base, config, rows, start, 4, engine.tokenizer.pad_token_id)
    got = finished["next"].adapter.named_tensors()
    assert max_relative_difference(expected, got) <= 1e-4
    assert max_relative_difference(start, got) > 1e-3


def test_init_from_own_saved_projections(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Saved projections other than the key's are this job's own, as PEFT loads them."""
    out = exported_vera(tiny_base, datasets["text"], tmp_path / "out")
    path = out / "adapter_model.safetensors"
    saved = load_file(str(path))
    saved["base_model.vera_A"] = saved["base_model.vera_A"] * 1.5
    save_file(saved, str(path), metadata={"format": "pt"})
    vera = vera_job(tiny_base, datasets["text"], name="next")
    config = vera.model_copy(update={"adapter": vera.adapter.model_copy(update={"init_from": out})})
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    shared = engine.jobs["next"].adapter.vera.shared
    assert torch.equal(shared.vera_A, saved["base_model.vera_A"])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(engine.logits("next", ids), expected, rtol=1e-5, atol=1e-5)


def test_variant_names_the_kind() -> None:
    assert AdapterSpec().variant == "lora"
    assert AdapterSpec(use_dora=True).variant == "lora+dora"
    assert AdapterSpec(peft_type="VERA").variant == "vera"
    assert adapter_variant({}) == "lora"  # a stored spec from before peft_type


@pytest.mark.integration
def test_two_ranks_equal_one(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    """The lambdas' gradients are all-reduced like LoRA's; the shared projections are
    drawn from projection_prng_key on each rank, so they agree without being sent."""
    vera = vera_job(tiny_base, datasets["messages"], max_steps=3, batch_size=5)
    vera = vera.model_copy(
        update={"adapter": vera.adapter.model_copy(update={"vera_dropout": 0.1})}
    )
    configs = [vera, job("plain", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=3)]
    prepare = partial(perturb, name="vera", seed=0)
    ranks = [r["vera"] for r in train_on_two_ranks(tiny_base, configs, tmp_path, prepare)]
    expected = train_on_one_rank(tiny_base, configs, prepare)["vera"]
    assert max_relative_difference(expected, ranks[0]) <= 1e-9
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)
