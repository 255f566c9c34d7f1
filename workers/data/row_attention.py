"""Attention for packed micro-batches: every row attends only to itself.

A packed micro-batch holds its rows end to end in one sequence, with
`position_ids` restarting at 0 for each row. transformers can mask that with a
dense block-diagonal [tokens, tokens] mask, but then attention costs the
square of the whole packed length. `carpool_rows` instead finds the rows from
`position_ids` (once per forward) and runs causal SDPA on each row alone: the
FLOPs of attention over the real rows and no mask tensor at all.

It is registered with transformers' attention and mask interfaces under one
name, so a model uses it through its own attention modules, unchanged. A
model it cannot serve exactly (sliding windows, soft-capped logits, attention
biases, or no `position_ids` in its attention kwargs) keeps the padded layout.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

ROW_ATTENTION = "carpool_rows"

# Attention implementations whose kernel and masking we know how to replace.
_REPLACEABLE = ("sdpa", "eager")


def packed_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot take packed rows through `carpool_rows`, or None if it can."""
    config = model.config
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take a pluggable attention function"
    if config._attn_implementation not in (*_REPLACEABLE, ROW_ATTENTION):
        return f"its attention is {config._attn_implementation!r}, not sdpa or eager"
    text = config.get_text_config()
    for field in ("sliding_window", "attn_logit_softcapping", "alibi", "position_embedding_type"):
        value = getattr(text, field, None)
        if field == "sliding_window" and getattr(text, "use_sliding_window", None) is False:
            continue  # Qwen2/Qwen3 carry a window they never apply unless this is on
        if value not in (None, False, "rope"):
            return f"its config sets {field}={value!r}, which per-row attention would ignore"
    return None


def use_row_attention(model: nn.Module) -> None:
    """Switch `model` to per-row attention (after `packed_unsupported` said it may)."""
    model.set_attn_implementation(ROW_ATTENTION)


class _RowBounds:
    """The rows of the last `position_ids` seen: one host read per forward, not per layer."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._bounds: list[list[tuple[int, int]]] = []

    def of(self, position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        if self._key is not position_ids:
            self._key, self._bounds = position_ids, [_rows(p) for p in position_ids.tolist()]
        return self._bounds


def _rows(positions: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(positions) if p == 0 or i == 0]
    return list(zip(starts, [*starts[1:], len(positions)], strict=True))


_bounds = _RowBounds()


def row_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA within each row of [batch, heads, seq, dim]; output [batch, seq, heads, dim]."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        # Not a packed training forward (a padding mask, a cache): plain SDPA is exact.
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    bounds = _bounds.of(position_ids)
    # One layout for the whole batch (default positions): each span over every batch row.
    batches = [slice(None)] if len(bounds) == 1 else [slice(b, b + 1) for b in range(len(bounds))]
    outputs = []
    for b, rows in zip(batches, bounds, strict=True):
        parts = [
            sdpa_attention_forward(
                module,
                query[b, :, start:end],
                key[b, :, start:end],
                value[b, :, start:end],
                None,
                is_causal=True,
                **kwargs,
            )[0]
            for start, end in rows
        ]
        outputs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def _no_mask(*args, **kwargs) -> None:
    """Rows are found from `position_ids`; no mask tensor is built."""
    return None


AttentionInterface.register(ROW_ATTENTION, row_attention_forward)
AttentionMaskInterface.register(ROW_ATTENTION, _no_mask)
