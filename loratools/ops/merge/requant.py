"""``merge --keep-quantization``: the math of writing merged weights back in the base's own quantization.

For each adapted quantized weight, with W0 = dequant(stored) and Δ = L @ R::

    W  = Q(W0 + Δ)                      requantized with fresh scales (bitsandbytes, FP8, GGUF)
    survival  = ‖W − W0‖_F / ‖Δ‖_F      how much of the update's size is still there
    direction = ⟨W − W0, Δ⟩ / (‖W − W0‖_F ‖Δ‖_F)   whether what is left still points along Δ
    lost_norm = ‖W − W0 − Δ‖_F

Pure: the quantizer ``Q`` comes in as a function. The stored formats, and the passes that copy
everything else as stored (a bitsandbytes or FP8 output keeps the base's files, a GGUF output is
one GGUF file), are the command's (:mod:`loratools.commands.merge_write`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from loratools import linalg
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.terms import TensorUpdate
from loratools.ops.merge.update import delta_norm, stacked_factors

__all__ = ["Requantize", "Requantizer", "requantized_update", "survival_stats", "unmerge_error"]

Requantize = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]  # W → (stored form, dequant(stored))
# A quantized checkpoint's ``requantize(name, w)``: w through name's quantization and back, None
# for a tensor that is not quantized.
Requantizer = Callable[[str, torch.Tensor], torch.Tensor | None]


def survival_stats(
    name: str, kind: str, w0: torch.Tensor, new: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> ModuleStats:
    """The record of one requantized weight (see the module docstring). ``w0``, ``new``: float32
    (d, k); ``left`` (d, R), ``right`` (R, k) with Δ = left @ right, never formed apart."""
    kept = new - w0  # (d, k): Q(W0 + Δ) − Q(W0)
    inner = float(((left.T @ kept) * right).sum())  # ⟨kept, LR⟩ = Σ (Lᵀ kept) ⊙ R
    kept_norm = linalg.frobenius(kept)
    lost_norm = linalg.frobenius(kept.addmm_(left, right, alpha=-1.0))
    dn = delta_norm(left, right)
    survival = kept_norm / dn if dn > 0 else math.nan
    direction = inner / (kept_norm * dn) if kept_norm > 0 and dn > 0 else 0.0
    base_norm = linalg.frobenius(w0)
    return ModuleStats(
        name, tuple(w0.shape), kind, 0, base_norm, dn, lost_norm, survival=survival, direction=direction
    )


def requantized_update(
    name: str,
    kind: str,
    w0: torch.Tensor,
    update: TensorUpdate,
    requantize: Requantize,
    device: str,
    rows: Callable[[torch.Tensor], torch.Tensor] = lambda m: m,
) -> tuple[Any, ModuleStats | None]:
    """``Q(W0 + Σ wᵢsᵢBᵢAᵢ)`` (stored form) and its survival record; a ``modules_to_save``
    replacement stands in for W0 and is requantized too. ``rows`` reorders the update's rows
    into the stored order (llama.cpp's q/k permutation: Δ = P·L·R, so only L is permuted)."""
    if update.replacement is not None:
        w0 = rows(update.replacement)
    w0 = w0.to(torch.float32)
    if not update.loras:
        stored, _ = requantize(w0)
        return stored, None
    left, right = stacked_factors(update, device)
    left = rows(left)
    total = w0.to(left.device, copy=True).addmm_(left, right).cpu()  # (d, k) float32
    stored, new = requantize(total)
    record = survival_stats(name, kind, w0, new, left.cpu(), right.cpu())
    return stored, replace(record, adapters=len(update.loras))


def unmerge_error(
    requantize: Requantizer | None, name: str, out: torch.Tensor, update: TensorUpdate, record: ModuleStats
) -> ModuleStats:
    """For adapters removed from a quantized model, ``record`` with ``quantization_error`` set.

    The removal starts from the *rounded* merge Q(W0 + Δ), so the output misses W0 by that
    rounding, ``Q(W0+Δ) − (W0+Δ)``, which nothing can recover. Its size is estimated by the
    rounding of the output itself, ``‖Q(W) − W‖``, in units of ‖Δ‖.
    """
    if requantize is None or not any(weight < 0 for _, weight, _ in update.loras):
        return record
    w = out.detach().to("cpu", torch.float32)
    back = requantize(name, w)
    if back is None:
        return record
    noise = linalg.frobenius(back - w)
    return replace(
        record, quantization_error=noise / record.delta_norm if record.delta_norm > 0 else math.inf
    )
