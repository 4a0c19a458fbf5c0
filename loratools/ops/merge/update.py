"""The math on one adapted tensor: ``round(W0 + L @ R)`` with its precision record.

``L @ R = Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ`` is never formed apart from the sum: the stacked factors go straight
into one ``addmm`` on a float32 copy of W0, and ‖Δ‖_F comes from two R×R Gram matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from loratools.errors import NonFiniteResult
from loratools.ops.delta import rows_per_block
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.terms import TensorUpdate

SAMPLE_ELEMENTS = 1 << 20  # precision stats look at about this many elements per tensor


def stacked_factors(
    update: TensorUpdate, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(L, R)`` with ``L @ R = Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ`` (transposed for fan_in_fan_out).

    Returns:
        L: (out, Σrᵢ) = [w₁s₁B₁ | …], R: (Σrᵢ, in) = [A₁; …] — or (in, Σrᵢ), (Σrᵢ, out) when
        transposed, since (sBA)ᵀ = Aᵀ (sB)ᵀ.
    """
    lefts, rights = [], []
    for lora, weight, transposed in update.loras:
        b, a = lora.scaled_factors()  # (out, r) · s, (r, in)
        b = (b * weight).to(device)
        a = a.to(device)
        lefts.append(a.T if transposed else b)
        rights.append(b.T if transposed else a)
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)


def delta_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L @ R‖_F without forming it: ‖LR‖² = tr(LᵀL · RRᵀ) = Σ (LᵀL) ⊙ (RRᵀ), both R×R."""
    gram = (left.T @ left) * (right @ right.T)  # (R, R)
    return math.sqrt(max(float(gram.sum()), 0.0))


class Scratch:
    """A reusable float32 buffer, grown to the largest tensor seen (no allocation per tensor)."""

    def __init__(
        self, device: torch.device | str = "cpu", take: Callable[[int], torch.Tensor] | None = None
    ) -> None:
        self.device = torch.device(device)
        self._flat = torch.empty(0, device=self.device)
        # ``take(nbytes)``: CPU uint8 memory for outputs, e.g. a recycling BufferRing's (io/buffers.py)
        self._take = take

    def get(self, shape: torch.Size) -> torch.Tensor:
        numel = shape.numel()
        if self._flat.numel() < numel:
            self._flat = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._flat[:numel].view(shape)

    def output(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised output tensor; on the CPU in memory from ``take`` when given."""
        if self.device.type != "cpu" or self._take is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._take(shape.numel() * dtype.itemsize).view(dtype).view(shape)

    def cast(self, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``total.to(dtype)`` (same rounding); on the CPU, into memory from ``take`` when given —
        the merge stream's recycles what the writer has let go: no fresh pages to fault in."""
        if total.device.type != "cpu" or self._take is None:
            return total.to(dtype)
        flat = self._take(total.numel() * dtype.itemsize).view(dtype)
        return flat.view(total.shape).copy_(total)


def sampled_rows(shape: torch.Size, budget: int = SAMPLE_ELEMENTS) -> tuple[slice, float]:
    """Every m-th row, so that about ``budget`` elements are looked at, and the factor d/|rows|
    that turns a squared norm over those rows into an estimate over all of them."""
    rows = shape[0] if len(shape) else 1
    step = max(1, math.ceil(shape.numel() / budget)) if rows else 1
    taken = len(range(0, rows, step))
    return slice(None, None, step), rows / taken if taken else 1.0


def apply_update(
    name: str,
    w0: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out_dtype: torch.dtype,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, ModuleStats]:
    """``round(W0 + L @ R)`` in ``out_dtype``, with its precision record.

    The sum is one ``addmm`` into a float32 copy of W0 and one cast. The record's norms
    ‖W0‖ and ‖round(W0+Δ) − round(W0) − Δ‖ are exact up to 2²⁰ elements; beyond that they are
    measured on every m-th row (about 2²⁰ elements) and scaled by d/rows — rounding errors are
    alike across rows, so the estimate is good to about 0.1%, at a tenth of the cost of a full
    pass. ‖Δ‖ is always exact (from the factors).

    Args:
        name: the tensor's name, for the record.
        w0: base tensor (d, k), any float dtype, on any device.
        left, right: float32 factors (d, R) and (R, k) from :func:`stacked_factors`.
        out_dtype: dtype of the result.
        scratch: a reusable buffer (on the factors' device) for narrower outputs.

    Returns:
        the merged tensor (d, k) in ``out_dtype`` on the factors' device, and its stats.
    """
    if w0.ndim > 2:  # a conv kernel (out, in, kh, kw): the update is its (out, in·kh·kw) matrix
        flat, stats = apply_update(name, w0.reshape(w0.shape[0], -1), left, right, out_dtype, scratch)
        return flat.reshape(w0.shape), replace(stats, shape=tuple(w0.shape))
    total: torch.Tensor | None = None  # W0 + Δ in float32, when it is kept whole
    if out_dtype != torch.float32 and scratch is not None and left.device.type == "cpu":
        out = _in_blocks(w0, left, right, out_dtype, scratch)
    else:
        if scratch is None or out_dtype == torch.float32:
            total = torch.empty(w0.shape, dtype=torch.float32, device=left.device)  # it is the output
        else:
            total = scratch.get(w0.shape)
        total.copy_(w0).addmm_(left, right)  # (d, k): W0 + Δ, rounded once to float32
        out = total if out_dtype == torch.float32 else total.to(out_dtype)
    check_finite(name, out, w0)
    rows, factor = sampled_rows(w0.shape)
    norm = delta_norm(left, right)
    if torch.finfo(out_dtype).eps > torch.finfo(w0.dtype).eps:
        lost_norm, base_round = _narrowed_loss(out[rows], w0[rows], left[rows], right, norm, factor)
    else:
        # round(W0+Δ) − W0 − Δ on the sampled rows: W0 is exact in the output dtype, so each
        # element loses at most |Δ| (round-to-nearest never moves farther than W0 is); (W0+Δ)₃₂
        # stands for W0 + Δ when the dtypes are equal (its own rounding is ≤ 2⁻²⁴·|W0+Δ|)
        lost = out[rows].to(torch.float32, copy=True)
        if out_dtype == w0.dtype and out_dtype != torch.float32:
            kept = total[rows] if total is not None else w0[rows].float().addmm_(left[rows], right)
            lost.sub_(kept)
        else:
            lost.sub_(w0[rows].to(out_dtype).float()).addmm_(left[rows], right, alpha=-1.0)
        lost_norm, base_round = float(torch.linalg.vector_norm(lost)) * math.sqrt(factor), 0.0
    stats = ModuleStats(
        name,
        tuple(w0.shape),
        str(out_dtype).removeprefix("torch."),
        adapters=0,
        base_norm=float(torch.linalg.vector_norm(w0[rows].float())) * math.sqrt(factor),
        delta_norm=norm,
        lost_norm=lost_norm,
        base_round_norm=base_round,
    )
    return out, stats


def _in_blocks(
    w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out_dtype: torch.dtype, scratch: Scratch
) -> torch.Tensor:
    """``round(W0 + L @ R)`` (d, k) in ``out_dtype``, a block of rows at a time on the CPU.

    Each block goes through a cache-sized float32 buffer: W0's rows upcast, the ``addmm`` of their
    rows of L, the cast into the output — the same arithmetic per element as one whole-tensor
    ``addmm`` (bit-identical outputs), without a d×k float32 tensor's trips to memory (an
    11008×4096 bf16 merge moves 4 bytes per element instead of 22).
    """
    d, k = w0.shape
    out = scratch.output(w0.shape, out_dtype)
    step = rows_per_block(k)
    buffer = scratch.get(torch.Size((min(step, d), k)))
    for start in range(0, d, step):
        block = buffer[: min(step, d - start)]
        block.copy_(w0[start : start + step]).addmm_(left[start : start + step], right)
        out[start : start + step].copy_(block)
    return out


def _narrowed_loss(
    out: torch.Tensor, w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, norm: float, factor: float
) -> tuple[float, float]:
    """(‖lost part of Δ‖, ‖round(W0) − W0‖) when the output dtype is narrower than W0's.

    Casting W0 itself moves it by ``e = round(W0) − W0``, which has nothing to do with the
    adapters. What the output carries of the update is ``u = round(W0+Δ) − round(W0)``: Δ plus
    rounding noise of the size of e. With W0's fractions spread over the output grid that noise
    is unbiased (rounding acts like stochastic rounding on Δ), so the share of Δ the output
    keeps is the projection ``κ = ⟨u, Δ⟩ / ‖Δ‖²``, and the lost part is ``(1 − κ)·‖Δ‖``, κ
    clipped to [0, 1]. ``‖u − Δ‖ / ‖Δ‖`` would count the noise as loss: it reaches several
    hundred percent for updates smaller than the noise that still survive in the mean.

    Args:
        out, w0: the sampled rows of the output and of the base, (m, k).
        left, right: the sampled rows of L (m, R) and all of R (R, k).
        norm: ‖Δ‖_F over all rows (exact, from the factors).
        factor: d / m, to scale the sampled sums to the whole tensor.
    """
    delta = left @ right  # (m, k) float32: only the sampled rows, about 2²⁰ elements
    rounded = w0.to(out.dtype).float()
    seen = out.to(torch.float32, copy=True).sub_(rounded)  # u = round(W0+Δ) − round(W0)
    kept = float((seen * delta).sum()) * factor / norm**2 if norm > 0 else 1.0
    base_round = float(torch.linalg.vector_norm(rounded.sub_(w0.float()))) * math.sqrt(factor)
    return (1.0 - min(max(kept, 0.0), 1.0)) * norm, base_round


def check_finite(name: str, out: torch.Tensor, w0: torch.Tensor) -> None:
    """Refuse a merged tensor with NaN/Inf where W0 was finite, before anything is published.

    A quick ``aminmax`` (NaN and ±Inf reach the min or max) screens the tensor; only a tensor
    that fails it is looked at element by element.

    Raises:
        NonFiniteResult: naming the tensor, how many values, and the usual cause.
    """
    if out.numel() == 0:
        return
    low, high = torch.aminmax(out)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    bad = int((~torch.isfinite(out) & torch.isfinite(w0.to(out.device))).sum())
    if bad:
        limit = torch.finfo(out.dtype).max
        raise NonFiniteResult(
            f"{name}: the merged weight has {bad} NaN/Inf value(s) where the base is finite (W0 + Δ "
            f"beyond {str(out.dtype).removeprefix('torch.')}'s range ±{limit:.4g}, or factors too large); "
            "nothing was written: merge to --dtype float32 or check the adapters' alpha and --weight"
        )
