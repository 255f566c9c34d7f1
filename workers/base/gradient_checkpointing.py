"""Gradient (activation) checkpointing for the frozen base's decoder layers.

A fused batch holds the rows of every job in a round, so activations, not
weights, bound how many jobs fit on a device. With checkpointing each decoder
layer keeps only its input during the forward and runs again in the backward.

HF's own switch (`gradient_checkpointing_enable`) acts only on modules in
training mode, and carpool keeps the base in eval mode (its dropout off), so
the layers are wrapped here instead. The rerun must see the same adapters and
dropout masks: the engine keeps the adapter routing active through the
backward, and LoRA dropout masks are seeded by row, not drawn from a stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes it names as never to be split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
            "gradient checkpointing cannot find its blocks"
        )
    return layers


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer in the backward; returns how many were wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_carpool_checkpointed", False):
            continue
        plain_forward = layer.forward

        def forward(*args: Any, _plain=plain_forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # inference: nothing to save anyway
                return _plain(*args, **kwargs)
            # Non-reentrant: works when no input requires grad (the base is frozen,
            # only the adapters inside the layer do) and with keyword arguments.
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._carpool_checkpointed = True
    return len(layers)
