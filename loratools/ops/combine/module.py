"""One output module from the adapters that carry it: ``exact`` concatenates the folded factors,
``svd`` truncates their sum's SVD without forming it, ``ties``/``dare`` go through the dense
deltas (:mod:`loratools.ops.combine.dense`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratools.adapter import LoraWeight, ModuleWeight
from loratools.linalg import energy_kept, factored_svd_sum, lora_from_svd
from loratools.ops.combine.dense import dense_module
from loratools.ops.combine.options import CombineOptions, Pair


def folded(
    items: list[tuple[int, ModuleWeight]], weights: Sequence[float], device: torch.device
) -> list[Pair]:
    """``(wᵢ·sᵢ·Bᵢ, Aᵢ)`` per adapter, float32 on ``device``; the weight goes into B only."""
    pairs = []
    for i, weight in items:
        b, a = weight.scaled_factors()  # (d, rᵢ), (rᵢ, k)
        pairs.append(((b * weights[i]).to(device), a.to(device)))
    return pairs


def combine_module(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """The combined LoraWeight of one module and the fraction of the combined delta's energy it keeps."""
    if options.method == "exact":
        b = torch.cat([b for b, _ in pairs], dim=1)  # (d, R)
        a = torch.cat([a for _, a in pairs], dim=0)  # (R, k)
        return LoraWeight(a.to("cpu", dtype), b.to("cpu", dtype), float(a.shape[0])), 1.0
    if options.method == "svd":
        svd = factored_svd_sum(pairs)
        rank = options.rank_rule.choose(svd.s, at_least=1)
        return lora_from_svd(svd, rank, options.split, dtype), energy_kept(svd.s, rank)
    return dense_module(name, pairs, options, dtype)
