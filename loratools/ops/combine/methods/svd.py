"""``svd``: the best rank-R' approximation of the sum (Eckart–Young), never formed.

QR of the stacked factors and an SVD of the R×R core (:func:`loratools.linalg.factored_svd_sum`),
O((d + k)·R²); equal to the truncated SVD of the dense sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.ops.combine.method import Method

if TYPE_CHECKING:
    import torch

    from loratools.adapter import LoraWeight
    from loratools.ops.combine.options import CombineOptions, Pair


def combine_svd(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """The top triplets of ``Σ Bᵢ Aᵢ`` at the options' rank rule, alpha = rank (scale 1)."""
    from loratools.linalg import energy_kept, factored_svd_sum, lora_from_svd

    svd = factored_svd_sum(pairs)
    rank = options.rank_rule.choose(svd.s, at_least=1)
    return lora_from_svd(svd, rank, options.split, dtype), energy_kept(svd.s, rank)


METHOD = Method(
    "svd",
    "optimal rank -r sum (default with -r/--energy)",
    truncates=True,
    density=False,
    combine=combine_svd,
)
