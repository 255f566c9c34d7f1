"""A fused micro-batch's loss at every position: the one forward training and eval share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from carpool.workers.data.dataset_rows import IGNORE_INDEX
from carpool.workers.data.fused_batch import FusedBatch
from carpool.workers.losses.chunked_loss import chunked_token_losses, loss_precision
from torch import nn


def token_nll(
    model: nn.Module, batch: FusedBatch, loss_chunk_tokens: int | None = None
) -> torch.Tensor:
    """Each position's cross-entropy, flattened, 0 where nothing is trained (call routed for
    the adapters, or not for the base alone).

    Padding and every row's last position carry no target. Padded rows need no
    attention mask: they are right-padded under a causal mask, so real tokens
    never attend to padding. Packed rows rely on row attention to stay apart.
    """
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    targets = batch.targets.flatten()
    # No job adapts the output layer (never a target), so it can be used as a frozen weight.
    if loss_chunk_tokens:
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return chunked_token_losses(
            hidden.flatten(0, 1), model.get_output_embeddings(), targets, loss_chunk_tokens
        )
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(
        loss_precision(logits).flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )


def position_losses(
    model: nn.Module, batch: FusedBatch, loss_chunk_tokens: int | None = None
) -> torch.Tensor:
    """Each position's cross-entropy times its job-step scale, flattened (call routed): the
    supervised loss (a preference pair's rows have scale 0 here; see `paired_terms`)."""
    return scaled(token_nll(model, batch, loss_chunk_tokens), batch)


def scaled(token_nll: torch.Tensor, batch: FusedBatch) -> torch.Tensor:
    """Each position's loss times its job-step scale, in the loss's own dtype (the scales
    are kept in float64, so a float64 run scales exactly: 1/41 in float32 is 4e-8 off)."""
    return token_nll * batch.token_scale.flatten().to(token_nll.dtype)


def add_segment_losses(
    losses: dict[str, float], batch: FusedBatch, token_loss: torch.Tensor
) -> None:
    """Sum a micro-batch's position losses into each job's total (one host sync)."""
    # float64 sums, whatever the dtype.
    sums = torch.zeros(len(batch.segments), dtype=torch.float64, device=token_loss.device)
    sums.index_add_(0, batch.token_segment, token_loss.detach().double())
    for seg, value in zip(batch.segments, sums.tolist(), strict=True):
        losses[seg.job] += value
