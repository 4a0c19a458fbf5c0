"""LoRALinear: a frozen ``nn.Linear`` plus a trainable low-rank update (Hu et al., 2021).

    h = W0 x + b0 + s · B A dropout(x),   A: (r, in),  B: (out, r)
    s = alpha / r          (rsLoRA: alpha / sqrt(r))

A starts random (Kaiming-uniform as in PEFT, or Gaussian with std 1/r) and B at zero, so the
wrapped layer initially computes exactly what the base layer did. The layer does no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratools.adapter import LoraWeight, lora_scale

__all__ = ["INITS", "LoRALinear"]

INITS = ("kaiming", "gaussian")


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable rank-``r`` update.

    Args:
        base: the layer to adapt; its parameters are frozen (``requires_grad = False``).
        rank: r, the rank of the update.
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: dropout probability applied to the input of the LoRA branch only.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        init: ``"kaiming"`` (PEFT's default: A ~ kaiming_uniform(a=√5)) or ``"gaussian"``
            (A ~ N(0, 1/r²)); B is zero either way.

    Example:
        >>> layer = LoRALinear(nn.Linear(32, 16), rank=4, alpha=8)
        >>> layer(torch.randn(2, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; use one of {', '.join(INITS)}")
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(alpha, rank, use_rslora)
        # LoRA factors live in float32 whatever the base dtype: Adam updates need the mantissa.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora(init)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (out, in), so code that reads ``.weight`` keeps working."""
        return self.base.weight

    def reset_lora(self, init: str = "kaiming") -> None:
        """Re-draw A (Kaiming-uniform or Gaussian) and zero B: the update ``B A`` is zero again."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b0 + s · B (A dropout(x))``; x (..., in) → (..., out)."""
        out = self.base(x)
        if self.merged:
            return out
        lora_x = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(lora_x, self.lora_A), self.lora_B)  # (..., out), rank-r bottleneck
        return out + (update * self.scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The dense update ``s · B @ A`` (out, in), float32."""
        return (self.lora_B.float() * self.scale) @ self.lora_A.float()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place: ``W0 ← W0 + s·B·A`` (math in float32)."""
        if not self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() + self.delta()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W0 ← W0 − s·B·A`` (exact in float32, one rounding in bf16)."""
        if self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() - self.delta()).to(weight.dtype))
            self.merged = False

    def to_lora_weight(self) -> LoraWeight:
        """The trained factors as a :class:`~loratools.adapter.LoraWeight` (detached CPU float32)."""
        a = self.lora_A.detach().float().cpu().clone()
        b = self.lora_B.detach().float().cpu().clone()
        return LoraWeight(a, b, self.alpha, self.use_rslora)

    @torch.no_grad()
    def load_lora_weight(self, weight: LoraWeight) -> None:
        """Set A and B from ``weight`` (e.g. to continue training a saved adapter).

        The scale is recomputed from ``weight``'s alpha and rank, so the delta is reproduced exactly.
        """
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"adapter factors of shape {weight.shape} do not fit a layer of {self.weight.shape}"
            )
        if weight.rank != self.rank:
            self.lora_A = nn.Parameter(torch.empty(weight.rank, self.in_features, device=self.lora_A.device))
            self.lora_B = nn.Parameter(torch.empty(self.out_features, weight.rank, device=self.lora_B.device))
            self.rank = weight.rank
        self.alpha, self.use_rslora = weight.alpha, weight.use_rslora
        self.scale = lora_scale(weight.alpha, weight.rank, weight.use_rslora)
        self.lora_A.copy_(weight.a.float())
        self.lora_B.copy_(weight.b.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:.4g}, merged={self.merged}"
