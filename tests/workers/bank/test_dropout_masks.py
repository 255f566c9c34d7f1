"""LoRA dropout masks: a function of (job seed, row, module, position, feature) alone."""

from __future__ import annotations

from pathlib import Path

import carpool.workers.bank.dropout_masks as dropout_masks
import pytest
import torch
from carpool.workers.bank.dropout_masks import hashed_keep_mask
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine
from carpool.workers.variants.job_adapter import JobAdapter

from tests.helpers.jobs import job
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import train_to_end

CPU = torch.device("cpu")


@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_hashed_mask_keeps_the_right_fraction(keep: float) -> None:
    kept = hashed_keep_mask([1, 2, 3, 4], torch.Size([4, 64, 512]), keep, CPU)
    assert abs(kept.float().mean().item() - keep) < 0.005
    # Per position and per feature too, not only on average.
    assert kept.float().mean(dim=(0, 2)).sub(keep).abs().max() < 0.06
    assert kept.float().mean(dim=(0, 1)).sub(keep).abs().max() < 0.12


def test_hashed_mask_is_prefix_stable_and_row_independent() -> None:
    long = hashed_keep_mask([7, 8, 9], torch.Size([3, 40, 96]), 0.8, CPU)
    short = hashed_keep_mask([8], torch.Size([1, 25, 96]), 0.8, CPU)
    assert torch.equal(short[0], long[1, :25])  # padding and neighbours change nothing


def test_hashed_masks_of_different_seeds_are_independent() -> None:
    keep = 0.7
    a, b = hashed_keep_mask([100, 101], torch.Size([2, 128, 256]), keep, CPU)
    agree = (a == b).float().mean().item()
    assert abs(agree - (keep**2 + (1 - keep) ** 2)) < 0.01
    # Neighbouring elements of one row are independent as well.
    left, right = a[:, :-1], a[:, 1:]
    assert abs((left == right).float().mean().item() - (keep**2 + (1 - keep) ** 2)) < 0.01


def test_row_seeds_depend_on_job_seed_row_and_module() -> None:
    a = JobAdapter("a", 4, 8, False, ("q_proj",), dropout=0.3, seed=5)
    b = JobAdapter("b", 4, 8, False, ("q_proj",), dropout=0.3, seed=6)
    seed = dropout_masks.row_seed
    assert seed(a, 0, 3) == seed(JobAdapter("other-name", 2, 1, True, "all-linear", 0.1, 5), 0, 3)
    assert len({seed(a, 0, 3), seed(a, 0, 4), seed(a, 1, 3), seed(b, 0, 3)}) == 4


def test_training_with_hashed_masks_does_not_depend_on_neighbours(
    tiny_base: Path, datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, adapter_math: str
) -> None:
    """The accelerator path, forced on CPU: the invariant holds with its masks too."""
    host_mask = dropout_masks.dropout_mask

    def hashed(adapter, module_index, row_ids, shape, like):
        seeds = [dropout_masks.row_seed(adapter, r, module_index) for r in row_ids]
        keep = 1.0 - adapter.dropout
        return hashed_keep_mask(seeds, shape, keep, like.device).to(like.dtype) / keep

    monkeypatch.setattr(dropout_masks, "dropout_mask", hashed)
    target = job(
        "target", tiny_base, datasets["prompt_completion"],
        AdapterSpec(r=4, target_modules="all-linear", lora_dropout=0.2),
        batch_size=6, shuffle=True, max_steps=4,
    )  # fmt: skip
    other = job("other", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=3)

    def train(configs, micro_batch_tokens=None) -> dict[str, torch.Tensor]:
        engine = Engine(
            str(tiny_base),
            device="cpu",
            micro_batch_tokens=micro_batch_tokens,
            adapter_math=adapter_math,
        )
        for config in configs:
            engine.add_job(config)
        return train_to_end(engine)["target"].adapter.named_tensors()

    alone = train([target])
    beside = train([other, target], micro_batch_tokens=120)
    # The bar of the other invariant tests (float32 sums in another order); masks that differ
    # must land above it (below).
    assert max_relative_difference(alone, beside) <= 1e-4
    monkeypatch.setattr(dropout_masks, "dropout_mask", host_mask)
    assert max_relative_difference(alone, train([target])) > 1e-4  # the masks really differ
