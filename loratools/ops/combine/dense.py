"""What the element-wise methods (TIES, DARE: :mod:`loratools.ops.combine.methods`) share.

They are defined entry by entry on ``wᵢ·ΔWᵢ`` stacked as (n, d, k), so they form the dense
deltas, one module at a time (n·d·k floats), then re-factor the result to rank R' with the
randomized SVD (exact SVD with ``energy``). Definitions follow ``peft.utils.merge_utils``.
"""

from __future__ import annotations

import torch

from loratools.adapter import LoraWeight
from loratools.linalg import energy_kept, exact_svd, lora_from_svd, randomized_svd
from loratools.ops.combine.options import CombineOptions, Pair


def dense_deltas(pairs: list[Pair]) -> torch.Tensor:
    """The weighted deltas ``wᵢ·sᵢ·Bᵢ·Aᵢ`` of one module, stacked: (n, d, k)."""
    return torch.stack([b @ a for b, a in pairs])


def refactor(merged: torch.Tensor, options: CombineOptions, dtype: torch.dtype) -> tuple[LoraWeight, float]:
    """The merged dense delta (d, k) as a LoRA module at the options' rank rule, and the energy kept."""
    total = float(merged.double().square().sum())
    if options.energy is not None:  # needs the whole spectrum
        svd = exact_svd(merged)
        rank = options.rank_rule.choose(svd.s, at_least=1)
    else:
        assert options.rank is not None  # guaranteed by CombineOptions.__post_init__
        rank = min(options.rank, *merged.shape)
        svd = randomized_svd(merged, rank, seed=options.seed)
    return lora_from_svd(svd, rank, options.split, dtype), energy_kept(svd.s, rank, total)
