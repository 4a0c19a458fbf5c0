"""``dare``: drop and rescale (Yu et al., 2023, https://arxiv.org/abs/2311.03099) of the dense
weighted deltas, then a truncated SVD (:func:`loratools.ops.combine.dense.refactor`)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from loratools.ops.combine.method import Method

if TYPE_CHECKING:
    import torch

    from loratools.adapter import LoraWeight
    from loratools.ops.combine.options import CombineOptions, Pair


def dare_merge(deltas: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE ("drop and rescale") of already weighted deltas, stacked (n, d, k) → (d, k).

    Each entry survives with probability ``density`` and is rescaled by 1/density, so every
    entry of the result is an unbiased estimate of the weighted sum: ``E[ΔW] = Σᵢ wᵢΔWᵢ``.
    The masks are drawn on the CPU from ``generator``, so results do not depend on the device.
    """
    import torch

    if density >= 1:
        return deltas.sum(0)
    keep = torch.rand(deltas.shape, generator=generator) < density  # (n, d, k)
    return (deltas * keep.to(deltas.device)).sum(0) / density


def combine_dare(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """DARE on the module's dense deltas, masks seeded by ``seed + crc32(name)`` (so each module
    draws its own, and a rerun the same), re-factored at the options' rank rule."""
    import torch

    from loratools.ops.combine.dense import dense_deltas, refactor

    assert options.density is not None  # guaranteed by CombineOptions.__post_init__
    generator = torch.Generator().manual_seed(options.seed + zlib.crc32(name.encode()))
    return refactor(dare_merge(dense_deltas(pairs), options.density, generator), options, dtype)


METHOD = Method(
    "dare", "drop and rescale, needs --density", truncates=True, density=True, combine=combine_dare
)
