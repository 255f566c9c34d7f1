"""The engine's CUDA paths against the same references as on CPU (skipped without a GPU).

`benchmarks/gpu.sh` runs these on a lent GPU. `CARPOOL_TEST_DEVICE=cpu` runs
them here, to check the tests themselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from carpool.workers.bank.dropout_masks import hashed_keep_mask
from carpool.workers.base.base_model import load_base
from carpool.workers.data.row_attention import use_row_attention
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine

from tests.helpers.jobs import changed, job, randomize_b, three_jobs
from tests.helpers.peft_reference import max_relative_difference, train_reference
from tests.helpers.round_driver import train_to_end

DEVICE = torch.device(os.environ.get("CARPOOL_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)
STEPS = 4


def short_jobs(base: Path, datasets: dict[str, Path]):
    return [changed(c, training={"max_steps": STEPS}) for c in three_jobs(base, datasets)]


@pytest.fixture(autouse=True)
def exact_float32_matmuls() -> None:
    """Float32 stays float32 (no TF32), so the bars are those of the CPU tests."""
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("batch_layout", ["packed", "padded"])
def test_fused_training_matches_single_job_peft(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str, batch_layout: str
) -> None:
    configs = short_jobs(tiny_base, datasets)
    engine = Engine(
        str(tiny_base),
        device=DEVICE,
        dtype=torch.float32,
        adapter_math=adapter_math,
        batch_layout=batch_layout,
    )
    assert engine.packed == (batch_layout == "packed")
    starts = {}
    for i, config in enumerate(configs):
        engine.add_job(config)
        starts[config.name] = randomize_b(engine, config.name, seed=i)
    finished = train_to_end(engine)
    for config in configs:
        rows = list(finished[config.name].dataset.rows)
        expected = train_reference(
            tiny_base, config, rows, starts[config.name], STEPS, engine.tokenizer.pad_token_id
        )  # PEFT on the CPU
        got = {k: v.cpu() for k, v in finished[config.name].adapter.named_tensors().items()}
        assert max_relative_difference(expected, got) <= 1e-4, config.name
        assert max_relative_difference(starts[config.name], got) > 1e-3, config.name


def test_packed_equals_padded_with_dropout(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    """Hashed dropout masks (the accelerator's) and row attention: the layout changes nothing."""
    target = job(
        "target", tiny_base, datasets["prompt_completion"],
        AdapterSpec(r=4, target_modules="all-linear", lora_dropout=0.2),
        batch_size=6, shuffle=True, max_steps=STEPS,
    )  # fmt: skip

    def train(layout: str) -> dict[str, torch.Tensor]:
        engine = Engine(
            str(tiny_base),
            device=DEVICE,
            dtype=torch.float32,
            micro_batch_tokens=96,
            adapter_math=adapter_math,
            batch_layout=layout,
        )
        for config in [*short_jobs(tiny_base, datasets), target]:
            engine.add_job(config)
        return train_to_end(engine)["target"].adapter.named_tensors()

    assert max_relative_difference(train("padded"), train("packed")) <= 1e-4


def test_hashed_masks_are_the_same_on_every_device() -> None:
    seeds, shape = [3, 2**40 + 7, 12345], torch.Size([3, 33, 96])
    on_device = hashed_keep_mask(seeds, shape, [0.9, 0.5, 0.7], DEVICE).cpu()
    assert torch.equal(
        on_device, hashed_keep_mask(seeds, shape, [0.9, 0.5, 0.7], torch.device("cpu"))
    )


def test_row_attention_keeps_rows_apart(tiny_base: Path) -> None:
    model = load_base(str(tiny_base), device=DEVICE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 500, (n,), generator=gen).to(DEVICE) for n in (7, 3, 11)]
    alone = [model(input_ids=r.view(1, -1)).logits[0] for r in rows]
    use_row_attention(model)
    positions = torch.cat([torch.arange(len(r), device=DEVICE) for r in rows]).view(1, -1)
    logits = model(input_ids=torch.cat(rows).view(1, -1), position_ids=positions).logits[0]
    assert torch.allclose(logits, torch.cat(alone), atol=1e-4)


def test_bf16_base_trains_float32_adapters_on_every_path(
    tiny_base: Path, datasets: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The half-precision set-up a GPU runs: each path gives the loop's adapters; a path
    that cannot run (grouped_mm wants bf16 operands) falls back, logged."""
    results = {}
    for path in ("loop", "bmm", "grouped_mm"):
        engine = Engine(str(tiny_base), device=DEVICE, dtype=torch.bfloat16, adapter_math=path)
        for config in short_jobs(tiny_base, datasets):
            engine.add_job(config)
        with caplog.at_level(logging.WARNING, logger="carpool.adapter_math"):
            done = train_to_end(engine)
        results[path] = done["text"].adapter.named_tensors()
        assert all(t.dtype == torch.float32 for t in results[path].values())
    # bf16 activations round differently per path: a looser bar than float32's.
    assert max_relative_difference(results["loop"], results["bmm"]) <= 2e-2
    assert max_relative_difference(results["loop"], results["grouped_mm"]) <= 2e-2
