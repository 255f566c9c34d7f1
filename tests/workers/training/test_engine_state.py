"""Dropout gradients, PEFT export / init_from, and exact resume from checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.bank.dropout_masks import dropout_mask
from carpool.workers.base.base_model import load_base
from carpool.workers.data.segment import Segment
from carpool.workers.peft_files.peft_format import AdapterFormatError, read_adapter
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.checkpoint import save_checkpoint
from carpool.workers.training.engine import Engine
from carpool.workers.variants.new_adapters import new_job_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import changed, job, randomize_b
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import train_to_end


def test_dropout_gradients_match_plain_per_row_reference(
    tiny_base: Path, adapter_math: str
) -> None:
    base = load_base(str(tiny_base), device=torch.device("cpu"))
    bank = AdapterBank(base, adapter_math=adapter_math)
    specs = {"a": (4, 8.0, 0.3, 1), "b": (2, 2.0, 0.5, 2)}  # r, alpha, dropout, seed
    for name, (r, alpha, p, seed) in specs.items():
        adapter = new_job_adapter(
            base, name, r=r, lora_alpha=alpha, use_rslora=False, dropout=p,
            target_modules=("q_proj",), seed=seed,
        )  # fmt: skip
        with torch.no_grad():
            for w in adapter.modules.values():
                w.lora_B.normal_(0, 0.1)
        bank.add(adapter)
    module_name = "model.layers.0.self_attn.q_proj"
    linear = base.get_submodule(module_name)
    segments = [Segment("a", 0, 3, (10, 11, 12)), Segment("b", 3, 5, (0, 4))]
    x = torch.randn(5, 7, linear.in_features, requires_grad=True)
    upstream = torch.randn(5, 7, linear.out_features)

    with bank.route(segments):
        (linear(x) * upstream).sum().backward()
    fused = {"x": x.grad.clone()}
    for name, adapter in bank.adapters.items():
        w = adapter.modules[module_name]
        fused[name] = (w.lora_A.grad.clone(), w.lora_B.grad.clone())
        w.lora_A.grad = w.lora_B.grad = None
    x.grad = None

    # Plain reference: one row at a time, explicit mask, explicit matmuls.
    total = 0
    for seg in segments:
        adapter = bank.adapters[seg.job]
        w = adapter.modules[module_name]
        for offset, row_id in enumerate(seg.row_ids):
            i = seg.start + offset
            mask = dropout_mask(adapter, w.module_index, [row_id], x[i : i + 1].shape, x)[0]
            assert 0.2 < (mask == 0).float().mean() < 0.7  # dropout really drops
            y = x[i] @ linear.weight.T + ((x[i] * mask) @ w.lora_A.T @ w.lora_B.T) * w.scaling
            total = total + (y * upstream[i]).sum()
    total.backward()
    torch.testing.assert_close(fused["x"], x.grad)
    for name, adapter in bank.adapters.items():
        w = adapter.modules[module_name]
        torch.testing.assert_close(fused[name][0], w.lora_A.grad)
        torch.testing.assert_close(fused[name][1], w.lora_B.grad)


def trained_engine(tiny_base: Path, datasets: dict[str, Path], steps: int = 4) -> Engine:
    engine = Engine(str(tiny_base), device="cpu")
    config = job(
        "exp",
        tiny_base,
        datasets["prompt_completion"],
        AdapterSpec(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        max_steps=steps,
    )
    engine.add_job(config)
    while engine.active_jobs():  # the engine's rounds alone: the job stays, for its logits
        engine.train_round()
    return engine


def test_export_loads_in_peft_with_identical_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    engine = trained_engine(tiny_base, datasets)
    out = engine.export("exp", tmp_path / "exp")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    got = engine.logits("exp", ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(input_ids=ids).logits
    assert (got - plain).abs().max() > 1e-4  # the adapter really changes the output


def test_init_from_exported_adapter_continues_from_its_weights(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    first = trained_engine(tiny_base, datasets)
    exported = first.export("exp", tmp_path / "exp")
    second = Engine(str(tiny_base), device="cpu")
    # The spec's own r and targets are overridden by what the adapter declares.
    config = job(
        "cont",
        tiny_base,
        datasets["text"],
        AdapterSpec(r=16, target_modules=["k_proj"], init_from=exported),
        max_steps=2,
    )
    second.add_job(config)
    start = second.jobs["cont"].adapter
    assert start.r == 4 and set(start.modules) == set(first.jobs["exp"].adapter.modules)
    assert (
        max_relative_difference(first.jobs["exp"].adapter.named_tensors(), start.named_tensors())
        == 0
    )
    ids = torch.randint(3, 200, (2, 9))
    torch.testing.assert_close(second.logits("cont", ids), first.logits("exp", ids), rtol=0, atol=0)
    assert train_to_end(second)["cont"].step == 2


def test_init_from_rejects_non_lora_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="not LORA"):
        read_adapter(tmp_path)


def test_init_from_rejects_corrupt_weights_and_missing_rank(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors: cannot read"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8}))
    with pytest.raises(AdapterFormatError, match="r must be a whole number >= 1, got None"):
        read_adapter(tmp_path)


def test_resume_from_checkpoint_equals_straight_run(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    # Shuffle, dropout, warmup + decay, clipping and LoRA+: all state must survive.
    config = job(
        "res",
        tiny_base,
        datasets["messages"],
        AdapterSpec(r=4, target_modules="all-linear", lora_dropout=0.2, loraplus_lr_ratio=4.0),
        max_steps=10,
        batch_size=3,
        shuffle=True,
        seed=3,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        max_grad_norm=1.0,
        num_epochs=None,
    )
    straight = Engine(str(tiny_base), device="cpu")
    straight.add_job(config)
    start = randomize_b(straight, "res", seed=0)
    expected = train_to_end(straight)["res"].adapter.named_tensors()

    first = Engine(str(tiny_base), device="cpu")
    first.add_job(config)
    first.jobs["res"].adapter.load_tensors(start)
    train_to_end(first, max_rounds=5)
    checkpoint = save_checkpoint(first.jobs["res"], tmp_path / "ckpt")
    del first
    resumed = Engine(str(tiny_base), device="cpu")
    resumed.add_job(config, resume_from=tmp_path / "ckpt")
    assert resumed.jobs["res"].step == 5 and checkpoint.name == "step-00000005"
    got = train_to_end(resumed)["res"].adapter.named_tensors()
    assert max_relative_difference(expected, got) <= 1e-6


def test_epochs_define_the_number_of_steps(tiny_base: Path, datasets: dict[str, Path]) -> None:
    engine = Engine(str(tiny_base), device="cpu")
    config = job("ep", tiny_base, datasets["text"], AdapterSpec(), batch_size=16)
    config = changed(config, training={"max_steps": None, "num_epochs": 1.5})
    training_job = engine.add_job(config)
    assert training_job.total_steps == 4  # 60 rows of a 40-row set, 16 per step
    rows_per_step = []
    while not training_job.done:
        rows_per_step.append(len(training_job.next_rows()[0]))
        engine.train_round()
    assert rows_per_step == [16, 16, 16, 12]


def test_a_diverging_job_fails_alone(tiny_base: Path, datasets: dict[str, Path]) -> None:
    good = job("good", tiny_base, datasets["text"], AdapterSpec(r=4), max_steps=6)
    # A learning rate this large makes the adapter blow up within a few steps.
    bad = job(
        "bad", tiny_base, datasets["messages"], AdapterSpec(r=4, target_modules="all-linear"),
        max_steps=6, learning_rate=1e30,
    )  # fmt: skip
    alone = Engine(str(tiny_base), device="cpu")
    alone.add_job(good)
    expected = train_to_end(alone)["good"].adapter.named_tensors()

    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(good)
    engine.add_job(bad)
    failures = []
    while engine.active_jobs():
        failures += [r for r in engine.train_round().values() if r.error]
    assert [r.job for r in failures] == ["bad"]
    assert "loss is" in failures[0].error or "non-finite" in failures[0].error
    assert engine.jobs["bad"].step < 6 and engine.jobs["good"].step == 6
    assert max_relative_difference(expected, engine.jobs["good"].adapter.named_tensors()) <= 1e-4
