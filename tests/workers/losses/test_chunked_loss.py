"""The loss through the frozen output layer, chunk by chunk: same numbers, no whole logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from carpool.workers.base.base_model import load_base
from carpool.workers.data.dataset import IGNORE_INDEX
from carpool.workers.losses.chunked_loss import chunked_token_losses, supports_chunked_loss
from carpool.workers.spec.job_spec import DatasetSpec
from carpool.workers.training.engine import Engine
from torch import nn

from tests.helpers.autograd_memory import kept_for_backward
from tests.helpers.jobs import changed, dropout_and_shuffle, three_jobs
from tests.helpers.peft_reference import max_relative_difference


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_losses_and_input_gradients_match_full_cross_entropy(chunk: int) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).double().requires_grad_(False)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, IGNORE_INDEX, 49, 0, IGNORE_INDEX, 7, 7])
    upstream = torch.rand(7, dtype=torch.float64)

    got = chunked_token_losses(hidden, head, targets, chunk)
    (got * upstream).sum().backward()
    got_grad, hidden.grad = hidden.grad.clone(), None

    want = F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (want * upstream).sum().backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, hidden.grad, rtol=1e-12, atol=1e-12)
    assert got[1] == 0 and got[4] == 0
    with torch.no_grad():  # evaluation: the same losses, no gradient work
        torch.testing.assert_close(chunked_token_losses(hidden, head, targets, chunk), got)


def train(base: Path, configs: list, **engine_kwargs) -> tuple[dict, list, int]:
    """Adapters, per-round losses, and the bytes autograd kept in the first round."""
    engine = Engine(
        str(base), device="cpu", dtype=torch.float64, micro_batch_tokens=256, **engine_kwargs
    )
    for config in configs:
        engine.add_job(config)
    with kept_for_backward() as kept:
        losses = [{k: r.loss for k, r in engine.train_round().items()}]
    while engine.active_jobs():
        losses.append({k: r.loss for k, r in engine.train_round().items()})
    adapters = {c.name: engine.jobs[c.name].adapter.named_tensors() for c in configs}
    return adapters, losses, kept.total


def test_engine_with_chunked_loss_trains_the_same_adapters(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    """In float64, so that only the math is compared: float32 AdamW would magnify the
    rounding of a reordered scaling (~1e-5 of the weights) into the comparison."""
    configs = dropout_and_shuffle(three_jobs(tiny_base, datasets))
    plain, plain_losses, plain_bytes = train(tiny_base, configs)
    chunked, chunked_losses, chunked_bytes = train(tiny_base, configs, loss_chunk_tokens=37)
    for config in configs:
        difference = max_relative_difference(plain[config.name], chunked[config.name])
        assert difference <= 1e-9, (config.name, difference)
    for got, want in zip(chunked_losses, plain_losses, strict=True):
        assert all(abs(got[k] - want[k]) <= 1e-12 * want[k] for k in want)
    assert chunked_bytes < 0.85 * plain_bytes, (chunked_bytes, plain_bytes)  # 0.81 measured


def test_models_whose_logits_cannot_be_chunked_are_named(tiny_base: Path) -> None:
    base = load_base(str(tiny_base), device=torch.device("cpu"))
    assert supports_chunked_loss(base) is None
    base.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in supports_chunked_loss(base)
    base.config.final_logit_softcapping = None
    base.get_output_embeddings().weight.requires_grad_(True)
    assert "trained" in supports_chunked_loss(base)


def test_an_unsupported_model_falls_back_with_a_warning(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        "carpool.workers.training.engine.supports_chunked_loss",
        lambda model: "its output layer is special",
    )
    engine = Engine(str(tiny_base), device="cpu", loss_chunk_tokens=8)
    assert engine.loss_chunk_tokens is None
    assert "loss_chunk_tokens ignored" in caplog.text and "special" in caplog.text
    with pytest.raises(ValueError, match="at least 1"):
        Engine(str(tiny_base), device="cpu", loss_chunk_tokens=0)


def test_evaluation_with_chunked_loss_gives_the_same_eval_loss(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    configs = [
        changed(c, eval_dataset=DatasetSpec(path=datasets["prompt_completion"]))
        for c in three_jobs(tiny_base, datasets)
    ]
    results = []
    for options in ({}, {"loss_chunk_tokens": 29}):
        engine = Engine(str(tiny_base), device="cpu", dtype=torch.float64, **options)
        for config in configs:
            engine.add_job(config)
        results.append(engine.evaluate())
    assert results[0].keys() == {c.name for c in configs}
    for name, loss in results[0].items():
        assert abs(results[1][name] - loss) <= 1e-12 * loss, name
