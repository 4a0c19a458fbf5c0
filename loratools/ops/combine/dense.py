"""TIES and DARE: element-wise methods on the dense per-module deltas.

Both are defined entry by entry on ``wᵢ·ΔWᵢ`` stacked as (n, d, k), so they form the dense
deltas, one module at a time (n·d·k floats), then re-factor the result to rank R' with the
randomized SVD (exact SVD with ``energy``). Definitions follow ``peft.utils.merge_utils``.
"""

from __future__ import annotations

import zlib

import torch

from loratools.adapter import LoraWeight
from loratools.linalg import energy_kept, exact_svd, lora_from_svd, randomized_svd
from loratools.ops.combine.options import CombineOptions, Pair


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest (TIES "trim")."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view_as(delta)


def ties_merge(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging of already weighted deltas ``wᵢΔWᵢ``, stacked (n, d, k) → (d, k).

    Trim each to its top-``density`` magnitudes (τ̂ᵢ); elect a sign per entry,
    γ = +1 where Σᵢ τ̂ᵢ ≥ 0 else −1; average the entries that agree with it:
    ``ΔW = Σᵢ [sign τ̂ᵢ = γ] τ̂ᵢ / max(1, #{i : sign τ̂ᵢ = γ})``. Trimmed zeros never count.

    Signs are elected on the *weighted* deltas (as mergekit does), so a negative weight really
    negates a task; ``peft.utils.merge_utils.ties`` elects them before weighting. The two agree
    whenever all weights are equal and positive.
    """
    trimmed = torch.stack([trim_magnitude(delta, density) for delta in deltas])  # (n, d, k)
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)  # (d, k)
    agree = trimmed.sign() == elected  # (n, d, k)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_merge(deltas: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE ("drop and rescale") of already weighted deltas, stacked (n, d, k) → (d, k).

    Each entry survives with probability ``density`` and is rescaled by 1/density, so every
    entry of the result is an unbiased estimate of the weighted sum: ``E[ΔW] = Σᵢ wᵢΔWᵢ``.
    The masks are drawn on the CPU from ``generator``, so results do not depend on the device.
    """
    if density >= 1:
        return deltas.sum(0)
    keep = torch.rand(deltas.shape, generator=generator) < density  # (n, d, k)
    return (deltas * keep.to(deltas.device)).sum(0) / density


def dense_module(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """ties/dare: element-wise on the dense deltas (n·d·k floats), then a truncated SVD."""
    assert options.density is not None  # guaranteed by CombineOptions.__post_init__
    deltas = torch.stack([b @ a for b, a in pairs])  # (n, d, k)
    if options.method == "ties":
        merged = ties_merge(deltas, options.density)
    else:
        generator = torch.Generator().manual_seed(options.seed + zlib.crc32(name.encode()))
        merged = dare_merge(deltas, options.density, generator)
    del deltas
    total = float(merged.double().square().sum())
    if options.energy is not None:  # needs the whole spectrum
        svd = exact_svd(merged)
        rank = options.rank_rule.choose(svd.s, at_least=1)
    else:
        assert options.rank is not None
        rank = min(options.rank, *merged.shape)
        svd = randomized_svd(merged, rank, seed=options.seed)
    kept = energy_kept(svd.s, rank, total)
    return lora_from_svd(svd, rank, options.split, dtype), kept
