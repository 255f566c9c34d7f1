"""AdaLoRA (`peft_type: ADALORA`): SVD-form updates whose ranks a per-job allocator prunes.

Fused training of an AdaLoRA job beside a plain LoRA job equals PEFT's own
single-job AdaLoRA loop (orthogonality penalty in the loss, `update_and_allocate`
after each step) with ranks actually pruned; alone, beside others, split into
micro-batches and resumed from a checkpoint end the same; the export loads in
PEFT with the same logits; schema errors name the field. A job started from a
saved AdaLoRA adapter (carpool's or PEFT's) trains as PEFT continues it after
`from_pretrained(is_trainable=True)`: its saved ranks fixed (PEFT's allocator
cannot run on a loaded adapter, pinned below); a finished one gives PEFT's logits.
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
from carpool.workers.peft_files.finished_adapters import load_finished_adapter
from carpool.workers.spec.job_spec import AdapterSpec, JobInputError, JobSpec, adapter_variant
from carpool.workers.training.engine import Engine
from carpool.workers.training.training_job import TrainingJob
from peft import AdaLoraConfig, PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import job
from tests.helpers.peft_reference import (
    max_relative_difference,
    pad_rows,
    train_loaded_reference,
)
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import assert_each_matches_peft, train_fused, train_one_way

STEPS = 8
# Budget falls from 4 to 2 ranks per module over steps 2-5, fixed from step 6.
ADALORA = dict(
    peft_type="ADALORA", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=STEPS, lora_alpha=8
)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def adalora_job(base: Path, data: Path, name: str = "ada", **training: object) -> JobSpec:
    adapter = AdapterSpec(**ADALORA, target_modules=TARGETS)
    return job(name, base, data, adapter, learning_rate=2e-2, max_steps=STEPS, **training)


def perturb(engine: Engine, name: str, seed: int) -> dict[str, torch.Tensor]:
    """E (and LoRA's B) off zero, so step 1 gives every weight a gradient and a score."""
    adapter = engine.jobs[name].adapter
    gen = torch.Generator().manual_seed(seed)
    start = {}
    for key, tensor in adapter.named_tensors().items():
        if key.endswith("lora_B") and adapter.peft_type == "LORA":
            tensor = torch.randn(tensor.shape, generator=gen) * 0.05
        elif key.endswith("lora_E"):
            tensor = torch.randn(tensor.shape, generator=gen) * 0.5
        start[key] = tensor.clone()
    adapter.load_tensors(start)
    return start


def test_start_and_size_estimate(tiny_base: Path, datasets: dict[str, Path]) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(adalora_job(tiny_base, datasets["text"]))
    w = engine.jobs["ada"].adapter.modules["model.layers.0.mlp.down_proj"]
    assert w.lora_A.shape[0] == 4 and w.lora_B.shape[1] == 4 and w.lora_E.shape == (4, 1)
    assert float(w.lora_E.detach().abs().max()) == 0.0
    assert 0.01 < float(w.lora_A.detach().std()) < 0.03  # PEFT's normal(0, 0.02)
    shapes = linear_module_shapes(str(tiny_base))
    spec = AdapterSpec(peft_type="ADALORA", init_r=4, total_step=8, target_modules=["q_proj"])
    q = [s for name, s in shapes.items() if name.endswith("q_proj")]
    assert adapter_memory_bytes(spec, shapes) == sum(4 * (i + 1 + o) for i, o in q) * 24


def test_fused_adalora_beside_lora_matches_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    configs = [
        adalora_job(tiny_base, datasets["prompt_completion"], batch_size=3),
        job("plain", tiny_base, datasets["text"], AdapterSpec(r=4, lora_alpha=8), max_steps=STEPS),
    ]
    fused = train_fused(tiny_base, configs, perturb, adapter_math="bmm")
    pattern = fused.finished["ada"].adapter.adalora.rank_pattern
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(kept) and min(kept) < 4  # pruned to the target budget
    assert_each_matches_peft(fused, STEPS, moved=None)


def test_alone_beside_others_split_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = adalora_job(tiny_base, datasets["messages"], batch_size=3)
    config = config.model_copy(
        update={"adapter": config.adapter.model_copy(update={"lora_dropout": 0.2})}
    )
    other = job("other", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=6)

    def check_resumed(job: TrainingJob) -> None:
        assert job.adapter.adalora.exp_avg_ipt

    train = partial(
        train_one_way,
        tiny_base,
        config,
        perturb=perturb,
        checkpoint=tmp_path / "ckpt",
        check_resumed=check_resumed,
    )

    alone = train()
    pattern = alone.job.adapter.adalora.rank_pattern
    for way in (dict(beside=[other]), dict(micro_batch_tokens=40), dict(resume_after=4)):
        trained = train(**way)
        # Summation order alone differs (micro-batches): far inside PEFT's 1e-4.
        assert max_relative_difference(alone.tensors, trained.tensors) <= 1e-5, way
        assert trained.job.adapter.adalora.rank_pattern == pattern, way


def trained_export(tiny_base: Path, datasets: dict[str, Path], out: Path) -> tuple[Engine, Path]:
    """An AdaLoRA job trained to the end by carpool and exported to `out`; its engine too."""
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(adalora_job(tiny_base, datasets["text"]))
    perturb(engine, "ada", seed=3)
    while engine.active_jobs():
        engine.train_round()
    return engine, engine.export("ada", out)


def test_export_loads_in_peft_with_the_same_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine, out = trained_export(tiny_base, datasets, tmp_path / "out")
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "ADALORA" and saved_config["init_r"] == 4
    key = "model.layers.0.self_attn.q_proj.lora_E"
    kept = sum(saved_config["rank_pattern"][key])
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved[f"base_model.model.{key}"].shape == (kept, 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(engine.logits("ada", ids), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_field(tiny_base: Path, datasets: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="ADALORA needs total_step"):
        AdapterSpec(peft_type="ADALORA")
    with pytest.raises(ValidationError, match="tinit"):
        AdapterSpec(peft_type="ADALORA", total_step=5, tinit=3, tfinal=2)
    raw = adalora_job(tiny_base, datasets["text"]).model_dump(mode="json", exclude_unset=True)
    assert check_spec(raw, "ada.yaml") == []
    del raw["adapter"]["total_step"]
    assert [p.field for p in check_spec(raw, "ada.yaml")] == ["adapter.total_step"]
    raw["adapter"]["total_step"] = STEPS
    raw["adapter"].update(r=4, use_dora=True, d_initial=0.3, beta1=1.5)
    problems = check_spec(raw, "ada.yaml")
    assert sorted(p.field for p in problems) == [
        "adapter.beta1",
        "adapter.d_initial",
        "adapter.r",
        "adapter.use_dora",
    ], problems
    lora = job("plain", tiny_base, datasets["text"], AdapterSpec(r=2))
    raw = lora.model_dump(mode="json", exclude_unset=True)
    raw["adapter"].update(init_r=6, total_step=10)
    problems = check_spec(raw, "plain.yaml")
    assert sorted(p.field for p in problems) == ["adapter.init_r", "adapter.total_step"]
    assert all("ADALORA option" in p.message for p in problems)
    ada = adalora_job(tiny_base, datasets["text"])
    bad = ada.model_copy(
        update={"adapter": ada.adapter.model_copy(update={"init_from": Path("x")})}
    )
    raw = bad.model_dump(mode="json", exclude_unset=True)
    problems = check_spec(raw, "ada.yaml")
    assert [p.field for p in problems] == ["adapter.init_from"], problems
    assert "not a directory" in problems[0].message
    with pytest.raises(JobInputError, match="init_from"):
        Engine(str(tiny_base), device="cpu").add_job(bad)


def test_variant_names_the_kind() -> None:
    assert AdapterSpec(peft_type="ADALORA", total_step=5).variant == "adalora"
    assert adapter_variant({"peft_type": "ADALORA"}) == "adalora"


@pytest.mark.integration
def test_two_ranks_equal_one(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    """The orthogonality penalty is added after the gradients' all-reduce (once, not once
    per rank), so every rank's allocator scores the same gradients and prunes alike."""
    configs = [adalora_job(tiny_base, datasets["messages"], batch_size=5)]
    prepare = partial(perturb, name="ada", seed=0)
    ranks = train_on_two_ranks(tiny_base, configs, tmp_path, prepare)
    expected = train_on_one_rank(tiny_base, configs, prepare)["ada"]
    assert max_relative_difference(expected, ranks[0]["ada"]) <= 1e-9
    assert all(torch.equal(ranks[0]["ada"][k], ranks[1]["ada"][k]) for k in expected)


def peft_saved_adalora(base: Path, rows: list, pad_id: int, out: Path) -> Path:
    """An AdaLoRA adapter PEFT trained through its whole schedule (ranks pruned) and saved."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = AdaLoraConfig(**ADALORA, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(STEPS):
        model(**pad_rows(rows[2 * step : 2 * step + 2], pad_id)).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.save_pretrained(str(out))
    return out


def continued_job(base: Path, data: Path, init_from: Path, steps: int = 4) -> JobSpec:
    adapter = AdapterSpec(**ADALORA, target_modules=TARGETS, init_from=init_from)
    return job("next", base, data, adapter, learning_rate=2e-2, max_steps=steps, batch_size=2)


def test_init_from_carpool_export_continues_like_peft(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    _, out = trained_export(tiny_base, datasets, tmp_path / "out")
    saved_config = json.loads((out / "adapter_config.json").read_text())
    # A spec leaving the adapter's fields out takes them, each noted; a differing one is
    # reported on its field.
    adapter = AdapterSpec(peft_type="ADALORA", init_from=out, target_modules=TARGETS)
    spec = job("next", tiny_base, datasets["messages"], adapter, learning_rate=2e-2, max_steps=4)
    raw = spec.model_dump(mode="json", exclude_unset=True)
    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(raw))
    notes: list = []
    [config] = validate_files([path], notes)
    a = config.adapter
    assert (a.init_r, a.target_r, a.tinit, a.tfinal, a.total_step, a.lora_alpha) == (
        4,
        2,
        1,
        2,
        STEPS,
        8,
    )
    assert {"adapter.init_r", "adapter.total_step", "adapter.lora_alpha"} <= {
        n.field for n in notes
    }, notes
    conflicting = {**raw, "adapter": {**raw["adapter"], "init_r": 6, "total_step": STEPS}}
    problems = check_spec(conflicting, "next.yaml")
    assert [p.field for p in problems] == ["adapter.init_r"], problems
    assert "conflicts with init_from's init_r 4" in problems[0].message

    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    saved = load_file(str(out / "adapter_model.safetensors"))
    start = {k: v.clone() for k, v in engine.jobs["next"].adapter.named_tensors().items()}
    assert {f"base_model.model.{k}" for k in start} == set(saved)
    for key, tensor in start.items():  # the kept ranks only, as PEFT resizes them
        assert torch.equal(tensor, saved[f"base_model.model.{key}"]), key
    while engine.active_jobs():
        engine.train_round()
    rows = list(engine.jobs["next"].dataset.rows)
    pad = engine.tokenizer.pad_token_id
    expected = train_loaded_reference(tiny_base, config, rows, out, 4, pad)
    got = engine.jobs["next"].adapter.named_tensors()
    assert max_relative_difference(expected, got) <= 1e-4
    assert max_relative_difference(start, got) > 1e-3
    # Its export keeps the loaded pattern and kept ranks, as PEFT's save_pretrained does.
    again = engine.export("next", tmp_path / "again")
    again_config = json.loads((again / "adapter_config.json").read_text())
    assert again_config["rank_pattern"] == saved_config["rank_pattern"]
    again_saved = load_file(str(again / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in again_saved.items()} == {k: v.shape for k, v in saved.items()}


def test_init_from_peft_saved_continues_like_peft_and_resumes(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    pad = engine.tokenizer.pad_token_id
    engine.add_job(adalora_job(tiny_base, datasets["text"]))
    rows = list(engine.jobs["ada"].dataset.rows)
    out = peft_saved_adalora(tiny_base, rows, pad, tmp_path / "peft")
    pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert any(sum(keep) < 4 for keep in pattern.values())  # some ranks were pruned
    config = continued_job(tiny_base, datasets["messages"], out)

    got = train_one_way(tiny_base, config)
    messages = list(got.job.dataset.rows)
    expected = train_loaded_reference(tiny_base, config, messages, out, 4, pad)
    assert max_relative_difference(expected, got.tensors) <= 1e-4
    resumed = train_one_way(tiny_base, config, resume_after=2, checkpoint=tmp_path / "ckpt")
    assert max_relative_difference(got.tensors, resumed.tensors) <= 1e-6


def test_peft_cannot_allocate_after_loading(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Why a started-from adapter keeps its ranks: past total_step - tfinal, PEFT's allocator
    masks with the saved init_r-long pattern, which no longer fits the resized E."""
    engine = Engine(str(tiny_base), device="cpu")
    pad = engine.tokenizer.pad_token_id
    engine.add_job(adalora_job(tiny_base, datasets["text"]))
    rows = list(engine.jobs["ada"].dataset.rows)
    out = peft_saved_adalora(tiny_base, rows, pad, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    assert model.base_model.rankallocator.init_bgt == 4 * len(
        model.peft_config["default"].rank_pattern
    )
    model(**pad_rows(rows[:2], pad)).loss.backward()
    with pytest.raises(RuntimeError):
        model.base_model.update_and_allocate(STEPS)


def test_finished_adapter_gives_peft_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(adalora_job(tiny_base, datasets["text"]))
    rows = list(engine.jobs["ada"].dataset.rows)
    out = peft_saved_adalora(tiny_base, rows, engine.tokenizer.pad_token_id, tmp_path / "peft")
    adapter = load_finished_adapter(engine.base, "done", out)
    assert adapter.dropout == 0.0
    engine.bank.add(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        without = engine.base(input_ids=ids).logits
    assert (expected - without).abs().max() > 1e-3  # the adapter does change the logits
    torch.testing.assert_close(engine.logits("done", ids), expected, rtol=1e-5, atol=1e-5)
