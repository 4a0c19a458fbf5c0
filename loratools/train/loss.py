"""The causal-LM loss, fused with a frozen output head so the (tokens × vocab) logits never persist.

For hidden states h (N, H), a frozen head W (V, H) and targets y (N,)::

    L = Σ_n [ logsumexp(W h_n) − (W h_n)_{y_n} ]            (positions with y_n = IGNORE skipped)
    ∂L/∂h_n = Wᵀ (softmax(W h_n) − onehot(y_n))

Because L is the end of the graph and W is frozen, ∂L/∂h can be computed in the forward pass,
chunk by chunk: each chunk's logits (C, V) live only while that chunk is processed. Compared with
``cross_entropy(lm_head(h))`` this does the same two matmuls but stores (N, H) instead of several
(N, V) tensors (logits, log-softmax, their gradients) and skips positions that carry no loss
(prompt tokens, padding) entirely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loratools.train.data import IGNORE

__all__ = ["fused_head_loss", "head_loss"]

CHUNK_BYTES = 32 << 20  # logits per chunk: 32 MB in float32


class _FusedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``h @ Wᵀ`` against ``targets``, its gradient w.r.t. h made in forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = int(max(1, CHUNK_BYTES // (4 * weight.shape[0])))
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], rows):
            h_c, y = h[start : start + rows], targets[start : start + rows]  # (C, H), (C,)
            logits = (h_c @ weight.T).float()  # (C, V)
            picked = logits.gather(1, y[:, None]).squeeze(1)  # (C,) the targets' logits
            peak = logits.amax(dim=-1, keepdim=True)  # (C, 1), for a stable exp
            probs = logits.sub_(peak).exp_()  # one exp pass, in the logits' memory
            mass = probs.sum(dim=-1, keepdim=True)  # (C, 1)
            total += (peak + mass.log()).squeeze(1).sub(picked).sum()  # Σ logsumexp − picked
            if grad is not None:
                probs.div_(mass)  # softmax
                probs.scatter_add_(1, y[:, None], torch.full_like(picked[:, None], -1.0))
                grad[start : start + rows] = (probs.to(weight.dtype) @ weight).to(h.dtype)  # (C, H)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * upstream.to(grad.dtype) if grad is not None else None), None, None


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over target positions of CE(W h_t, labels[t + 1]); hidden (B, T, H), labels (B, T).

    Positions whose next label is IGNORE (and each row's last position) cost nothing: they are
    dropped before the head is applied. ``weight`` must be frozen.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1).flatten()  # (B·T,)
    keep = targets != IGNORE
    h = hidden.flatten(0, 1)[keep]  # (N, H): only rows that carry a loss
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    return _FusedHeadLoss.apply(h, weight, targets[keep])


def head_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss; fused when the head is a frozen ``nn.Linear``, plain otherwise."""
    weight = getattr(head, "weight", None)
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and weight is not None
        and not weight.requires_grad
    ):
        return fused_head_loss(hidden, weight, labels)
    logits = head(hidden)  # (B, T, V): a trainable or adapted head needs autograd through it
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
