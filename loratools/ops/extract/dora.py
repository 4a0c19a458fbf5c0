"""``extract --dora``: a DoRA adapter from a base and its full fine-tune (derivation: docs/extract.md).

DoRA writes the fine-tuned weight as ``W' = diag(m / ‖W0 + Δ‖_row) · (W0 + Δ)`` with Δ of rank r:
each row of W' is the row of ``W0 + Δ`` rescaled to length mᵢ. So only the *direction* of each
row of ``W0 + Δ`` matters, and the magnitude is free per row. For the fine-tune ``Y = W_ft``:

1. Magnitude, given the directions ``uᵢ = Dᵢ / ‖Dᵢ‖`` (D = W0 + Δ): ``mᵢ = ⟨uᵢ, Yᵢ⟩`` minimises
   ``‖mᵢuᵢ − Yᵢ‖`` (a projection onto the line); the error per row is ``‖Yᵢ‖ sin θᵢ``. When the
   direction is exact this is ``mᵢ = ‖Yᵢ‖``, the row norm of W_ft.
2. Direction: Dᵢ may be any positive multiple ``cᵢYᵢ`` of the target row, so Δ needs only to make
   ``W0 + Δ`` parallel to Y row by row: ``Δ = diag(c)·Y − W0`` up to a rank-r residual. With
   ``tᵢ = 1/cᵢ``, the first-order angle of row i is ``‖(Yᵢ − tᵢW0ᵢ)P‖ / ‖Yᵢ‖`` where ``P = I − VVᵀ``
   projects out the rank-r row space V of Δ. Minimising ``J(t, V) = Σᵢ ‖(Yᵢ − tᵢW0ᵢ)P‖² / ‖Yᵢ‖²``
   alternates two exact steps, so J never increases:

   - V for fixed t: the top-r right singular vectors of ``N = diag(1/‖Y‖_row)(Y − diag(t)W0)``
     (Eckart–Young);
   - t for fixed V: per row, least squares ``tᵢ = ⟨YᵢP, W0ᵢP⟩ / ‖W0ᵢP‖²`` (clamped to ``t_min``
     so every cᵢ stays positive and finite).

   Then ``Δ = (diag(c)Y − W0)·VVᵀ``, rank r, factored ``B = (diag(c)Y − W0)V``, ``A = Vᵀ``.

The start is the plain LoRA of the same rank (t = 1, V from ΔW = Y − W0); every iterate is scored by
its actual error ``‖W' − Y‖_F`` and the best is kept. The plain LoRA's own direction with the
magnitudes of step 1 is one of the candidates, and it is never worse than the plain LoRA (whose
magnitude ``‖W0ᵢ + Δᵢ‖`` is one feasible mᵢ), so the DoRA error never exceeds the plain LoRA
error at the same rank (up to rounding the factors to the output dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from loratools import linalg
from loratools.adapter import LoraWeight
from loratools.errors import LoratoolsError
from loratools.ops.dora import dora_weight
from loratools.progress import Progress, no_progress

__all__ = ["DoraExtractReport", "add_dora", "dora_module"]

T_MIN = 1e-2  # smallest tᵢ = 1/cᵢ: keeps the direction's scale positive and below 100× the target
ITERATIONS = 8  # most alternations after the start
STALL = 1e-3  # stop once an alternation lowers ‖W' − W_ft‖ by less than this fraction


@dataclass(frozen=True)
class DoraExtractReport:
    """One module's DoRA fit: ``relative_error = ‖W' − W_ft‖_F / ‖ΔW‖_F`` beside the plain LoRA's
    ``‖ΔW − s·B·A‖_F / ‖ΔW‖_F`` at the same rank; ``iteration`` is the iterate kept (0: the LoRA's
    direction with fitted magnitudes)."""

    name: str
    rank: int
    relative_error: float
    lora_relative_error: float
    iteration: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "rank": self.rank, "relative_error": self.relative_error,
            "lora_relative_error": self.lora_relative_error, "iteration": self.iteration,
        }  # fmt: skip


def _fit_magnitude(direction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """mᵢ = ⟨Dᵢ/‖Dᵢ‖, Yᵢ⟩ (step 1) and ‖diag(m)·D/‖D‖_row − Y‖_F."""
    unit = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    m = (unit * target).sum(dim=1)  # (out,)
    return m, linalg.frobenius(unit.mul_(m[:, None]).sub_(target))


def _row_space(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (in, r) of the rows of A (r, in)."""
    return torch.linalg.qr(a.T.float()).Q


def _step(
    w0: torch.Tensor, y: torch.Tensor, v: torch.Tensor, rank: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """One alternation: t from the current V, then the new V; returns (B, A, V) with Δ = B @ A."""
    y_p = y - (y @ v) @ v.T  # (out, in): Y P
    w_p = w0 - (w0 @ v) @ v.T
    t = ((y_p * w_p).sum(1) / (w_p * w_p).sum(1).clamp_min(torch.finfo(torch.float32).tiny)).clamp_min(T_MIN)
    del y_p, w_p
    norms = y.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    n = (y - t[:, None] * w0).div_(norms[:, None])  # (out, in): N(t)
    v = linalg.randomized_svd(n, rank, niter=2, seed=seed).vh.T  # (in, r)
    del n
    target = y / t[:, None] - w0  # (out, in): diag(c)·Y − W0
    return target @ v, v.T.contiguous(), v  # B (out, r), A (r, in), V


def dora_module(
    name: str,
    w0: torch.Tensor,
    w_ft: torch.Tensor,
    lora: LoraWeight,
    *,
    iterations: int = ITERATIONS,
    seed: int = 0,
) -> tuple[LoraWeight, DoraExtractReport]:
    """The DoRA module of rank ``lora.rank`` that best reproduces ``w_ft`` (see the module docstring).

    Args:
        name: the module, for the report.
        w0: base weight (out, in).
        w_ft: fine-tuned weight (out, in).
        lora: the plain LoRA extracted at this rank (the start, and the error to beat).
        iterations: at most this many alternations after the start (fewer once they stall).
        seed: the randomized SVD's seed.

    Returns:
        the DoRA module (same rank, alpha and dtype as ``lora``) and its report.
    """
    w0, y = w0.float(), w_ft.float()
    delta_norm = linalg.frobenius(y - w0)
    plain = w0 + lora.delta()  # W0 + s·B·A, the plain LoRA's weight
    lora_error = linalg.frobenius(plain - y)
    b, a = lora.scaled_factors()
    best = (_fit_magnitude(plain, y)[1], 0, b, a)
    v, previous = _row_space(a), math.inf
    for iteration in range(1, iterations + 1):
        b, a, v = _step(w0, y, v, lora.rank, seed)
        error = _fit_magnitude(torch.addmm(w0, b, a), y)[1]
        if error < best[0]:
            best = (error, iteration, b, a)
        if error >= (1.0 - STALL) * previous:  # no longer improving: the rest would cost SVDs for nothing
            break
        previous = error
    _, iteration, b, a = best
    weight = _dora_weight(w0, y, b, a, lora, refactor=iteration > 0)
    merged, _ = dora_weight(w0, weight)
    error = linalg.frobenius(merged.sub_(y))  # with the stored (rounded) factors
    scale = delta_norm if delta_norm > 0 else 1.0
    report = DoraExtractReport(name, lora.rank, error / scale, lora_error / scale, iteration)
    return weight, report


def _dora_weight(
    w0: torch.Tensor, y: torch.Tensor, b: torch.Tensor, a: torch.Tensor, lora: LoraWeight, refactor: bool
) -> LoraWeight:
    """The DoRA module: balanced factors of Δ = B @ A (√S on both sides, the LoRA's alpha folded
    in; the LoRA's own factors when its direction won) and m fitted to them as rounded.

    m stays float32 whatever the factors' dtype: a bf16 magnitude moves each row of W' by up to
    2⁻⁹ of its norm, which for a fine-tune is more than the whole update (‖ΔW‖ ≪ ‖W0‖).
    """
    factors = lora
    if refactor:
        b, a = linalg.factored_svd(b, a).truncate(lora.rank).factors("sqrt")  # (out, r), (r, in)
        root = math.sqrt(lora.scale)
        b, a = b / root, a / root  # so that scale · B @ A = Δ
        factors = replace(lora, a=a.to(lora.dtype).contiguous(), b=b.to(lora.dtype).contiguous())
    m, _ = _fit_magnitude(w0 + factors.delta(), y)  # fitted to the rounded factors
    return replace(factors, magnitude=m)


def add_dora(
    pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    weights: dict[str, Any],
    *,
    iterations: int = ITERATIONS,
    seed: int = 0,
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], list[DoraExtractReport]]:
    """Turn every extracted plain LoRA module into DoRA, one (module, W0, W_ft) at a time.

    Args:
        pairs: (module, base weight, fine-tuned weight) for every module of ``weights``.
        weights: the extracted modules (module → plain LoraWeight).
        iterations, seed: see :func:`dora_module`.
        progress: called once per module.

    Returns:
        module → DoRA LoraWeight, and the reports in order.

    Raises:
        LoratoolsError: an embedding module (DoRA on embeddings is not supported).
    """
    out: dict[str, Any] = {}
    reports = []
    for name, w0, w_ft in pairs:
        lora = weights[name]
        if getattr(lora, "embedding", False) or not isinstance(lora, LoraWeight):
            raise LoratoolsError(
                f"{name}: DoRA on embedding modules is not supported; drop --embeddings lora"
            )
        out[name], report = dora_module(name, w0, w_ft, lora, iterations=iterations, seed=seed)
        reports.append(report)
        progress(name)
    return out, reports
