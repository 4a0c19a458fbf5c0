"""The rounding noise floor of ΔW = W_ft − W_base when the base is quantized.

A quantized base stores Q(W) for some float W that is gone: ΔW then holds the fine-tune's update
plus the rounding Q(W) − W, which is full-rank noise. That rounding cannot be known, but a
matrix of the same kind can: the fine-tune put through the base's own quantization,

    N = Q(W_ft) − W_ft        (same scheme, same block sizes, a matrix of the same statistics)

Singular values of ΔW below σ₁(N) are indistinguishable from rounding; ``above`` counts those
that stand out. When the fine-tune is quantized too, requantizing it changes (almost) nothing,
so no floor is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loratools import linalg

EXACT_BELOW = 512  # an exact spectral norm below this size; a randomized top-4 SVD above it


@dataclass(frozen=True)
class NoiseFloor:
    """The rounding noise of one module's quantized base (see the module docstring).

    Attributes:
        norm: ‖N‖_F.
        top: σ₁(N), the largest singular value rounding alone makes.
        above: how many of ΔW's computed singular values exceed ``top`` (None when not known).
        delta_norm: ‖ΔW‖_F, for the ratio.
    """

    norm: float
    top: float
    above: int | None  # None where ΔW's singular values are not at hand (extract)
    delta_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_floor": {
                "top_singular_value": self.top,
                "frobenius_norm": self.norm,
                "relative_to_delta": self.norm / self.delta_norm if self.delta_norm > 0 else None,
                "singular_values_above": self.above,
            }
        }


def noise_floor(
    base: Any,
    finetuned: Any,
    name: str,
    w_ft: torch.Tensor,
    singular_values: torch.Tensor | None,
    energy: float,
) -> NoiseFloor | None:
    """The floor for ``name`` when ``base`` is quantized and ``finetuned`` is not; else None.

    Args:
        base, finetuned: checkpoints; a quantized one has ``requantize(name, w)`` returning
            dequant(Q(w)) (None for a plain tensor).
        name: the tensor.
        w_ft: the fine-tune's tensor (out, in).
        singular_values: ΔW's computed singular values, descending (None: ``above`` unknown).
        energy: ‖ΔW‖²_F.
    """
    requantize: Callable[[str, torch.Tensor], torch.Tensor | None] | None = getattr(base, "requantize", None)
    # asked before the float32 copy of w_ft: for a plain base (the usual case) that copy was half
    # of a 7 B extract's page faults, made only to be thrown away
    if requantize is None or not _requantizes(base, name):
        return None
    if _requantizes(finetuned, name):
        return None  # both quantized: the fine-tune's own rounding is already in it
    w = w_ft.detach().to("cpu", torch.float32)
    back = requantize(name, w)
    if back is None:
        return None
    noise = back.sub_(w)  # (out, in)
    if min(noise.shape) <= EXACT_BELOW:
        top = float(torch.linalg.matrix_norm(noise, ord=2))
    else:
        top = float(linalg.randomized_svd(noise, 4, niter=2).s[0])
    above = None if singular_values is None else int((singular_values > top).sum())
    return NoiseFloor(linalg.frobenius(noise), top, above, energy**0.5)


def _requantizes(checkpoint: Any, name: str) -> bool:
    """Whether ``checkpoint.requantize(name, ·)`` gives a tensor (``requantizes(name)`` where the
    checkpoint says; otherwise only that it has ``requantize``)."""
    if getattr(checkpoint, "requantize", None) is None:
        return False
    says = getattr(checkpoint, "requantizes", None)
    return bool(says(name)) if says is not None else True
