"""``exact``: ΔW = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …], the concatenation, rank R = Σrᵢ.

Exact up to the output dtype's rounding; cost O((d + k)·R), no arithmetic beyond one scaling of
each B (done when the pairs are folded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.ops.combine.method import Method

if TYPE_CHECKING:
    import torch

    from loratools.adapter import LoraWeight
    from loratools.ops.combine.options import CombineOptions, Pair


def combine_exact(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """The concatenated factors, alpha = R (scale 1); all the energy is kept."""
    import torch

    from loratools.adapter import LoraWeight

    b = torch.cat([b for b, _ in pairs], dim=1)  # (d, R)
    a = torch.cat([a for _, a in pairs], dim=0)  # (R, k)
    return LoraWeight(a.to("cpu", dtype), b.to("cpu", dtype), float(a.shape[0])), 1.0


METHOD = Method(
    "exact",
    "concatenate the factors, rank Σrᵢ (default)",
    truncates=False,
    density=False,
    combine=combine_exact,
)
