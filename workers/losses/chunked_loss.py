"""Cross-entropy through the frozen output layer, a chunk of tokens at a time.

A fused batch holds every job's rows, and with a large vocabulary its logits
(tokens x vocab, kept in float32 for the loss and again for its gradient)
outweigh the whole decoder's activations. The output layer is frozen, so its
only gradient is the one w.r.t. its input: the forward computes, chunk by
chunk, each token's loss and that gradient (softmax - one-hot) @ W, and keeps
only the latter, the size of the hidden states. No chunk's logits outlive it.
carpool never adapts the output layer (it is no LoRA target), so it is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from carpool.workers.data.dataset import IGNORE_INDEX
from torch import nn


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the loss takes them: half precision upcast to float32, others kept."""
    return logits.float() if logits.element_size() < 4 else logits


def _chunked_losses(
    hidden: torch.Tensor,  # [tokens, hidden]
    weight: torch.Tensor,  # [vocab, hidden], frozen
    bias: torch.Tensor | None,
    targets: torch.Tensor,  # [tokens], IGNORE_INDEX where untrained
    chunk_tokens: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token's loss and, if asked, d(loss)/d(hidden) per token, chunk by chunk."""
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    losses = torch.zeros(hidden.shape[0], dtype=loss_dtype, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if with_grad else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        target = targets[start:end]
        trained = target != IGNORE_INDEX
        # Same numerics as the unchunked path: logits in the base's dtype, loss in float32.
        logits = loss_precision(F.linear(hidden[start:end], weight, bias))
        safe = torch.where(trained, target, 0)
        log_probs = torch.log_softmax(logits, dim=-1)
        losses[start:end] = -log_probs.gather(1, safe[:, None])[:, 0] * trained
        if grad_hidden is not None:
            grad_logits = log_probs.exp_()  # softmax, in place of the log-probs
            grad_logits[torch.arange(end - start, device=safe.device), safe] -= 1.0
            grad_logits *= trained[:, None]
            grad_hidden[start:end] = grad_logits.to(hidden.dtype) @ weight
    return losses, grad_hidden


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int) -> torch.Tensor:
        losses, grad_hidden = _chunked_losses(hidden, weight, bias, targets, chunk_tokens, True)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


def chunked_token_losses(
    hidden: torch.Tensor, output_layer: nn.Linear, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Cross-entropy of every token [tokens] (0 where untrained), without keeping logits."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    weight, bias = output_layer.weight, output_layer.bias
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # evaluation: losses only
        return _chunked_losses(hidden, weight, bias, targets, chunk_tokens, False)[0]
    return _FrozenLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens)


def supports_chunked_loss(model: nn.Module) -> str | None:
    """Why this model's logits cannot be chunked this way, or None when they can."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    if head.weight.requires_grad:
        return "its output layer is trained"
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"it transforms its logits ({name})"
    return None
