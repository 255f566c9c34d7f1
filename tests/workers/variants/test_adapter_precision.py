"""Adapters stay float32 beside a half-precision base, so small updates are not lost."""

from __future__ import annotations

from pathlib import Path

import torch
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine
from carpool.workers.variants.job_adapter import adapter_dtype
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import job


def test_adapter_dtype_upcasts_only_half_precision() -> None:
    assert adapter_dtype(torch.bfloat16) == torch.float32
    assert adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float32) == torch.float32
    assert adapter_dtype(torch.float64) == torch.float64  # exact tests keep their precision


def test_bf16_base_trains_float32_adapters_that_peft_loads(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, adapter_math: str
) -> None:
    engine = Engine(str(tiny_base), device="cpu", dtype=torch.bfloat16, adapter_math=adapter_math)
    # An update of ~lr per step is far below bf16's resolution at A's magnitude
    # (~0.1, spacing ~5e-4): bf16 adapter weights would not move at all.
    config = job(
        "small-lr",
        tiny_base,
        datasets["prompt_completion"],
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        max_steps=3,
        learning_rate=1e-5,
    )
    engine.add_job(config)
    adapter = engine.jobs["small-lr"].adapter
    start = {k: v.clone() for k, v in adapter.named_tensors().items()}
    assert all(t.dtype == torch.float32 for t in start.values())
    while engine.active_jobs():  # the engine's rounds alone: the job stays, for its logits below
        engine.train_round()
    end = adapter.named_tensors()
    for name in start:
        if name.endswith("lora_A"):
            assert not torch.equal(start[name], end[name]), f"{name} did not move"
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in adapter.parameters())

    # The export is float32 and PEFT, upcasting the same way, gives the same logits.
    out = engine.export("small-lr", tmp_path / "small-lr")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    # Rows enough that rounding the delta to bf16 before adding it (twice, unlike PEFT) shows.
    ids = torch.randint(3, 200, (8, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    got = engine.logits("small-lr", ids)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
