"""Packed micro-batches: rows end to end, attention kept within each row, the same adapters."""

from __future__ import annotations

import logging
from pathlib import Path

import carpool.workers.bank.dropout_masks as dropout_masks
import pytest
import torch
from carpool.workers.bank.dropout_masks import hashed_keep_mask, hashed_packed_mask
from carpool.workers.base.base_model import load_base
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.fused_batch import StepRow, collate, plan_micro_batches
from carpool.workers.data.row_attention import packed_unsupported, use_row_attention
from carpool.workers.data.segment import Segment
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine
from carpool.workers.variants.job_adapter import JobAdapter

from tests.helpers.jobs import changed, job, randomize_b, three_jobs
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import train_to_end

CPU = torch.device("cpu")


def row(job: str, length: int, row_id: int, scale: float = 0.5) -> StepRow:
    ids = tuple(range(10 + row_id, 10 + row_id + length))
    labels = (IGNORE_INDEX, *ids[1:])
    return StepRow(job, TokenizedRow(ids, labels), row_id, scale)


def test_packing_fills_token_capacity_longest_first() -> None:
    rows = [row("a", n, i) for i, n in enumerate([5, 9, 3, 7, 2, 6])]
    bins = plan_micro_batches(rows, max_tokens=12, packed=True)
    assert [[len(r.row.input_ids) for r in b] for b in bins] == [[9, 3], [7, 5], [6, 2]]
    assert all(sum(len(r.row.input_ids) for r in b) <= 12 for b in bins)
    # A row longer than the budget goes alone; None is one micro-batch.
    assert [len(b) for b in plan_micro_batches([row("a", 20, 99), *rows], 12, packed=True)][0] == 1
    assert len(plan_micro_batches(rows, None, packed=True)) == 1


def test_packed_collate_restarts_positions_and_never_targets_across_rows() -> None:
    rows = [row("b", 3, 4, 0.25), row("a", 4, 1), row("b", 2, 7, 0.25)]
    batch = collate(rows, pad_token_id=0, device=CPU, packed=True)
    assert batch.packed and batch.input_ids.shape == (1, 9)
    # Grouped by job, in order of first appearance: b's two rows, then a's.
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch.input_ids.tolist() == [[14, 15, 16, 17, 18, 11, 12, 13, 14]]
    # Each row's last position predicts nothing: no target is the next row's first token.
    t = IGNORE_INDEX
    assert batch.targets.tolist() == [[15, 16, t, 18, t, 12, 13, 14, t]]
    assert batch.token_scale.tolist() == [[0.25] * 5 + [0.5] * 4]
    assert batch.token_segment.tolist() == [0] * 5 + [1] * 4
    assert [(s.job, s.start, s.end, s.row_ids, s.lengths) for s in batch.segments] == [
        ("b", 0, 2, (4, 7), (3, 2)),
        ("a", 2, 3, (1,), (4,)),
    ]
    padded = collate(rows, pad_token_id=0, device=CPU)
    assert padded.position_ids is None and padded.input_ids.shape == (3, 4)
    assert padded.token_segment.tolist() == [0] * 8 + [1] * 4
    # Rows that pad to (nearly) nothing stay padded: one attention call instead of one per row.
    even = collate([row("a", 9, 0), row("b", 10, 1)], pad_token_id=0, device=CPU, packed=True)
    assert not even.packed and even.input_ids.shape == (2, 10)


def test_row_attention_keeps_rows_apart(tiny_base: Path) -> None:
    """A packed forward gives each row the logits it gets alone."""
    model = load_base(str(tiny_base), device=CPU, dtype=torch.float64)
    rows = [
        torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 11)
    ]
    alone = [model(input_ids=r.view(1, -1)).logits[0] for r in rows]
    use_row_attention(model)
    packed = torch.cat(rows).view(1, -1)
    positions = torch.cat([torch.arange(len(r)) for r in rows]).view(1, -1)
    logits = model(input_ids=packed, position_ids=positions).logits[0]
    assert torch.allclose(logits, torch.cat(alone), atol=1e-10)
    # Padded batches (default positions) still work under it, e.g. for `Engine.logits`.
    padded = torch.stack([r[:3] for r in rows])
    assert torch.allclose(model(input_ids=padded).logits[1], alone[1], atol=1e-10)


def test_packed_training_equals_padded(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    """Same jobs, same budget: the adapters do not depend on the layout (float64)."""
    configs = [
        *(changed(c, training={"max_steps": 3}) for c in three_jobs(tiny_base, datasets)),
        job(
            "dropped", tiny_base, datasets["prompt_completion"],
            AdapterSpec(r=4, target_modules="all-linear", lora_dropout=0.2),
            batch_size=6, shuffle=True, max_steps=3,
        ),
    ]  # fmt: skip

    def train(layout: str) -> dict[str, dict[str, torch.Tensor]]:
        engine = Engine(
            str(tiny_base),
            device="cpu",
            dtype=torch.float64,
            micro_batch_tokens=96,
            adapter_math=adapter_math,
            batch_layout=layout,
        )
        assert engine.packed == (layout == "packed")
        for i, config in enumerate(configs):
            engine.add_job(config)
            randomize_b(engine, config.name, seed=i)
        done = train_to_end(engine)
        return {c.name: done[c.name].adapter.named_tensors() for c in configs}

    padded, packed = train("padded"), train("packed")
    for config in configs:
        assert max_relative_difference(padded[config.name], packed[config.name]) <= 1e-9


def test_hashed_packed_mask_is_each_rows_padded_mask() -> None:
    """The accelerator's packed dropout masks are the first positions of the padded ones."""
    a = JobAdapter("a", 4, 8, False, ("q_proj",), dropout=0.3, seed=5)
    b = JobAdapter("b", 4, 8, False, ("q_proj",), dropout=0.1, seed=6)
    segments = [Segment("a", 0, 2, (3, 9), (5, 2)), Segment("b", 2, 3, (4,), (6,))]
    mask = hashed_packed_mask([(a, 2), (b, 2)], segments, 16, torch.zeros((), dtype=torch.float64))
    assert mask.shape == (13, 16)
    expected = []
    for adapter, row_id, length in [(a, 3, 5), (a, 9, 2), (b, 4, 6)]:
        seed = [dropout_masks.row_seed(adapter, row_id, 2)]
        keep = 1.0 - adapter.dropout
        expected.append(
            hashed_keep_mask(seed, torch.Size([1, 8, 16]), keep, CPU)[0, :length].double() / keep
        )
    assert torch.equal(mask, torch.cat(expected))


def test_models_per_row_attention_cannot_serve_keep_padded_rows(
    tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_base(str(tiny_base), device=CPU, dtype=torch.float32)
    assert packed_unsupported(model) is None
    model.config.sliding_window = 4
    assert "sliding_window=4" in packed_unsupported(model)
    model.config.sliding_window = None
    model.set_attn_implementation("eager")
    assert packed_unsupported(model) is None
    with caplog.at_level(logging.WARNING, logger="carpool.engine"):
        engine = Engine(str(tiny_base), device="cpu", batch_layout="padded")
    assert not engine.packed and engine.base.config._attn_implementation != "carpool_rows"
    with pytest.raises(ValueError, match="batch_layout must be one of auto, padded, packed"):
        Engine(str(tiny_base), device="cpu", batch_layout="flat")
