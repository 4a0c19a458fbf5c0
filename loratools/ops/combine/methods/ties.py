"""``ties``: TIES-merging (Yadav et al., 2023, https://arxiv.org/abs/2306.01708) of the dense
weighted deltas, then a truncated SVD (:func:`loratools.ops.combine.dense.refactor`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratools.ops.combine.method import Method

if TYPE_CHECKING:
    import torch

    from loratools.adapter import LoraWeight
    from loratools.ops.combine.options import CombineOptions, Pair


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest (TIES "trim")."""
    import torch

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
    import torch

    trimmed = torch.stack([trim_magnitude(delta, density) for delta in deltas])  # (n, d, k)
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)  # (d, k)
    agree = trimmed.sign() == elected  # (n, d, k)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine_ties(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """TIES on the module's dense deltas (n·d·k floats), re-factored at the options' rank rule."""
    from loratools.ops.combine.dense import dense_deltas, refactor

    assert options.density is not None  # guaranteed by CombineOptions.__post_init__
    return refactor(ties_merge(dense_deltas(pairs), options.density), options, dtype)


METHOD = Method("ties", "TIES-merging, needs --density", truncates=True, density=True, combine=combine_ties)
