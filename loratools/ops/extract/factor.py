"""The math on one module: ΔW in a reused buffer, its truncated SVD, the rank, the factors, the residual.

For one 2-D weight (out, in)::

    ΔW = W_ft − W_base                          (float32, one reused buffer)
    ΔW ≈ U_r S_r V_rᵀ                           (randomized range finder, or the full SVD)
    B = U_r √S_r (out, r),  A = √S_r V_rᵀ (r, in),  alpha = r  →  scale = alpha / r = 1

and ``relative_error = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F``, measured from the written (cast) factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from loratools import linalg
from loratools.adapter import LoraWeight
from loratools.kinds import embedding
from loratools.kinds.fused import FusedParam, expert_lora, fused_name
from loratools.linalg import Svd, batched_randomized_svd, exact_svd, randomized_svd
from loratools.ops.delta import DeltaBuffer
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import Item
from loratools.ops.spectrum.noise import NoiseFloor


@dataclass(frozen=True)
class ModuleReport:
    """One factored module: its rank, the energy its rank keeps, and the achieved error.

    ``energy_kept = Σ_{i≤r} σᵢ² / ‖ΔW‖²_F``; ``relative_error = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F``.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float
    relative_error: float
    delta_norm: float  # ‖ΔW‖_F
    noise_floor: NoiseFloor | None = None  # a quantized base's rounding (ops/spectrum/noise.py)


def truncated_spectrum(
    delta: torch.Tensor, width: int, options: ExtractOptions, buffer: DeltaBuffer | None = None
) -> Svd:
    """The top ``width`` singular triplets of ΔW (out, in), randomized unless ``options.exact``
    (the range finder's rounded copy of ΔW in ``buffer``, the one ΔW was formed in, if given)."""
    width = min(width, *delta.shape)
    if options.exact:
        return exact_svd(delta).truncate(width)
    copy = None if buffer is None else buffer.rounded(delta)
    return randomized_svd(delta, width, seed=options.seed, range_copy=copy)


def truncated_spectra(stack: torch.Tensor, width: int, options: ExtractOptions) -> list[Svd]:
    """:func:`truncated_spectrum` of every ΔW of a stack (b, out, in) of one shape, as one batched SVD."""
    width = min(width, *stack.shape[1:])
    if options.exact:
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)  # (b, out, n), (b, n), (b, n, in)
        return [Svd(u[i], s[i], vh[i]).truncate(width) for i in range(stack.shape[0])]
    return batched_randomized_svd(stack, width, seed=options.seed)


def choose_rank(s: torch.Tensor, total: float, options: ExtractOptions) -> int:
    """The rank the options' rule picks from singular values ``s`` (descending) of a ΔW with ‖ΔW‖²_F = total
    (:meth:`loratools.linalg.RankRule.choose`; a fixed rank or a budget's rank keeps the width computed)."""
    return options.rank_rule.choose(s, total)


def lora_from_svd(svd: Svd, rank: int, options: ExtractOptions, dtype: torch.dtype) -> LoraWeight:
    """LoRA factors of the rank-``rank`` truncation with the options' split and alpha
    (:func:`loratools.linalg.lora_from_svd`: ``scale · B @ A = U_r S_r V_rᵀ``)."""
    return linalg.lora_from_svd(svd, rank, options.split, dtype, options.alpha)


def residual_norm(delta: torch.Tensor, weight: LoraWeight) -> float:
    """``‖ΔW − s·B·A‖_F`` in float32; overwrites ``delta`` (the buffer) with the residual."""
    b, a = weight.scaled_factors()  # (out, r), (r, in)
    delta.addmm_(b.to(delta.device), a.to(delta.device), alpha=-1.0)
    return linalg.frobenius(delta)


def factor_module(
    item: Item,
    delta: torch.Tensor,
    total: float,
    rank: int | None,
    options: ExtractOptions,
    dtype: torch.dtype,
    buffer: DeltaBuffer | None = None,
) -> tuple[LoraWeight, ModuleReport] | None:
    """Factor one ΔW: compute its spectrum, choose the rank, write factors, measure the error
    (``buffer``: the one ΔW was formed in, see :func:`truncated_spectrum`)."""
    svd = truncated_spectrum(delta, rank if rank is not None else options.width, options, buffer)
    return factor_from_svd(item, delta, total, svd, rank, options, dtype)


def factor_from_svd(
    item: Item,
    delta: torch.Tensor,
    total: float,
    svd: Svd,
    rank: int | None,
    options: ExtractOptions,
    dtype: torch.dtype,
) -> tuple[LoraWeight, ModuleReport] | None:
    """Factor one ΔW from its truncated SVD: choose the rank, write factors, measure the error."""
    chosen = choose_rank(svd.s, total, options) if rank is None else min(rank, svd.rank)
    if chosen == 0:
        return None
    module = item.name.removesuffix(".weight")
    weight = lora_from_svd(svd, chosen, options, dtype)
    if embedding.is_lookup(module):  # same factors; PEFT stores them in its embedding layout
        weight = replace(weight, embedding=True)
    energy = float(svd.s[:chosen].double().square().sum()) / total
    error = residual_norm(delta, weight) / math.sqrt(total)
    shape = (int(item.shape[0]), int(item.shape[1]))
    return weight, ModuleReport(module, shape, chosen, min(energy, 1.0), error, math.sqrt(total))


def factor_fused(
    item: Item,
    delta: torch.Tensor,
    ranks: list[int] | None,
    options: ExtractOptions,
    dtype: torch.dtype,
    param: FusedParam,
    depth: int,
) -> list[tuple[LoraWeight, ModuleReport]]:
    """Factor a fused expert tensor's ΔW (E, p, q): one LoRA per expert, one rank r for all.

    PEFT stores one rank for the E experts of a parameter (:mod:`loratools.kinds.fused`). The rank
    rule picks r_e per expert (``ranks`` fixes them, for a budget) and r = max_e r_e; every expert
    then keeps its top r singular triplets, not r_e and zero columns: the file holds r columns
    per expert either way, so the extra triplets cost nothing and lower the error (each expert's
    error is the rank-r Eckart–Young error, ≤ the rank-r_e one). Empty list when r = 0.
    """
    width = max(ranks) if ranks is not None else options.width
    if width == 0:
        return []
    totals = delta.square().sum(dim=(1, 2)).tolist()  # ‖ΔW[e]‖²_F, (E,)
    svds = truncated_spectra(delta, width, options)  # one batched SVD for the E experts
    if ranks is None:
        ranks = [
            choose_rank(svd.s, total, options) if total > 0 else 0
            for svd, total in zip(svds, totals, strict=True)
        ]
    rank = min(max(ranks), svds[0].rank)  # every slice has the same shape, so the same cap
    if rank == 0:
        return []
    shape = (int(item.shape[1]), int(item.shape[2]))
    out: list[tuple[LoraWeight, ModuleReport]] = []
    for e, (svd, total) in enumerate(zip(svds, totals, strict=True)):
        weight = expert_lora(lora_from_svd(svd, rank, options, dtype), param, e, depth)
        if total > 0:
            energy = min(float(svd.s[:rank].double().square().sum()) / total, 1.0)
            error = residual_norm(delta[e], weight) / math.sqrt(total)
        else:  # an expert the fine-tune left alone: zero factors (PEFT stores every expert)
            energy, error = 1.0, 0.0
        report = ModuleReport(fused_name(param.name, e), shape, rank, energy, error, math.sqrt(total))
        out.append((weight, report))
    return out
