"""Gradient checkpointing changes memory, never the result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from carpool.workers.base.base_model import load_base
from carpool.workers.base.gradient_checkpointing import (
    decoder_layers,
    enable_gradient_checkpointing,
)
from carpool.workers.spec.job_spec import AdapterSpec
from carpool.workers.training.engine import Engine
from torch import nn

from tests.helpers.autograd_memory import kept_for_backward
from tests.helpers.jobs import dropout_and_shuffle, job, three_jobs
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import train_to_end


def train(base: Path, configs: list, **engine_kwargs) -> tuple[dict, int]:
    """Adapters after training, and the bytes autograd kept for the first round's backward."""
    engine = Engine(str(base), device="cpu", micro_batch_tokens=256, **engine_kwargs)
    for config in configs:
        engine.add_job(config)
    with kept_for_backward() as kept:
        engine.train_round()
    finished = train_to_end(engine)
    adapters = {c.name: finished[c.name].adapter.named_tensors() for c in configs}
    return adapters, kept.total


def test_checkpointed_training_equals_plain_and_keeps_less(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    configs = dropout_and_shuffle(three_jobs(tiny_base, datasets))
    plain, plain_bytes = train(tiny_base, configs, adapter_math=adapter_math)
    checkpointed, checkpointed_bytes = train(
        tiny_base, configs, gradient_checkpointing=True, adapter_math=adapter_math
    )
    for config in configs:
        difference = max_relative_difference(plain[config.name], checkpointed[config.name])
        assert difference <= 1e-6, (config.name, difference)
    # Only each layer's input (and the head's) is kept, not every activation inside.
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)  # 0.27


def test_every_decoder_layer_is_wrapped_once(tiny_base: Path) -> None:
    base = load_base(str(tiny_base), device=torch.device("cpu"))
    layers = decoder_layers(base)
    assert len(layers) == base.config.num_hidden_layers
    assert enable_gradient_checkpointing(base) == len(layers)
    wrapped = [layer.forward for layer in layers]
    enable_gradient_checkpointing(base)  # again: no second wrapper
    assert [layer.forward for layer in layers] == wrapped


def test_a_model_without_named_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="_no_split_modules"):
        enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_inference_is_not_checkpointed(
    tiny_base: Path, datasets: dict[str, Path], adapter_math: str
) -> None:
    config = job("a", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=1)
    plain = Engine(str(tiny_base), device="cpu", adapter_math=adapter_math)
    checkpointed = Engine(
        str(tiny_base), device="cpu", gradient_checkpointing=True, adapter_math=adapter_math
    )
    ids = torch.randint(3, 200, (2, 7))
    for engine in (plain, checkpointed):
        engine.add_job(config)
    torch.testing.assert_close(checkpointed.logits("a", ids), plain.logits("a", ids))
