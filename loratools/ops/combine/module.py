"""One output module from the adapters that carry it: fold each adapter's weight and scale into
its B, then the chosen method (:data:`loratools.ops.combine.methods.METHODS`) combines them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratools.adapter import LoraWeight, ModuleWeight
from loratools.ops.combine.methods import METHODS
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
    assert options.method is not None  # resolved by CombineOptions.__post_init__
    return METHODS[options.method].combine(name, pairs, options, dtype)
