"""QLoRA: jobs on a 4-bit base train as PEFT trains them on that base, and never share
a base with jobs of another quantization."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.workers.job_spec import AdapterSpec, JobSpec, QuantizationSpec

from tests.helpers.jobs import changed, job
from tests.helpers.peft_reference import max_relative_difference, train_reference

# float32 compute keeps the comparison exact on CPU; the 4-bit weights are what is tested.
NF4 = QuantizationSpec(
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
)
STEPS = 4


def two_4bit_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    text = job(
        "text",
        base,
        datasets["text"],
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        batch_size=4,
        learning_rate=1e-2,
        max_seq_length=12,
        max_steps=STEPS,
    )
    qa = job(
        "qa",
        base,
        datasets["prompt_completion"],
        AdapterSpec(r=8, lora_alpha=16, target_modules="all-linear"),
        batch_size=3,
        learning_rate=5e-3,
        max_grad_norm=0.5,
        max_seq_length=32,
        max_steps=STEPS,
    )
    return [changed(c, base_quantization=NF4) for c in (text, qa)]


def test_4bit_jobs_fused_match_peft_on_the_same_4bit_base(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    pytest.importorskip("bitsandbytes")
    from carpool.workers.engine import Engine

    from tests.helpers.jobs import randomize_b
    from tests.helpers.round_driver import train_to_end

    configs = two_4bit_jobs(tiny_base, datasets)
    engine = Engine(str(tiny_base), device="cpu", quantization=NF4)
    starts = {}
    for i, config in enumerate(configs):
        engine.add_job(config)
        starts[config.name] = randomize_b(engine, config.name, seed=i)
    finished = train_to_end(engine)
    for config in configs:
        got = finished[config.name].adapter.named_tensors()
        assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in got.values())
        rows = list(finished[config.name].dataset.rows)
        expected = train_reference(
            tiny_base, config, rows, starts[config.name], STEPS, engine.tokenizer.pad_token_id
        )
        assert max_relative_difference(expected, got) <= 1e-4, config.name
        assert max_relative_difference(starts[config.name], got) > 1e-3, config.name
