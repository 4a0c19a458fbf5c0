"""Weighted sums of LoRA adapters: exact, optimal low rank, TIES and DARE.

Adapters i = 1…n with user weights wᵢ and module updates ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` (sᵢ = αᵢ/rᵢ, or
αᵢ/√rᵢ with rsLoRA, per module — :meth:`LoraWeight.scaled_factors` applies it) add up to::

    ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]       (d×Σrᵢ)·(Σrᵢ×k)

- ``exact``: that concatenation, rank R = Σrᵢ. Exact up to the output dtype's rounding.
  Cost O((d + k)·R) — no arithmetic beyond one scaling of each B.
- ``svd``: the best rank-R' approximation of the sum (Eckart–Young): QR of the stacked factors
  and an SVD of the R×R core (:func:`loratools.linalg.factored_svd_sum`), O((d + k)·R²). Equal to
  the truncated SVD of the dense sum, which is never formed.
- ``ties`` (Yadav et al., 2023, https://arxiv.org/abs/2306.01708) and ``dare`` (Yu et al., 2023,
  https://arxiv.org/abs/2311.03099) are defined element-wise on the dense per-module deltas, so
  they form them, one module at a time (n·d·k floats), then re-factor to rank R' with the
  randomized SVD (exact SVD with ``energy``). Definitions follow ``peft.utils.merge_utils``.

wᵢ·sᵢ is folded into Bᵢ only: a negative weight negates one factor, never both. Every output
module gets ``alpha = rank`` (scale 1, no rsLoRA), so the factors alone carry the delta.

Modules present in only some adapters are summed over those adapters (kept with their weight).
``saved_modules`` (PEFT's ``modules_to_save``) are whole replacement tensors, not deltas, so no
weight can apply to them; see :class:`CombineOptions` ``saved_modules`` for the rule.

The package: :mod:`.options` (CombineOptions and the result types), :mod:`.methods` (one file
per method and the ``METHODS`` registry; :mod:`.method` says what a method is), :mod:`.module`
(one module: fold the weights, dispatch), :mod:`.dense` (what TIES and DARE share),
:mod:`.saved` (``modules_to_save``), and :mod:`.api` (:func:`combine_adapters`, the whole adapter).
Exports load lazily, so the CLI reads ``METHODS`` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.ops.combine.api import combine_adapters
    from loratools.ops.combine.methods.dare import dare_merge
    from loratools.ops.combine.methods.ties import ties_merge, trim_magnitude
    from loratools.ops.combine.options import CombineOptions, CombineResult, ModuleCombine

_EXPORTS = {
    "CombineOptions": "loratools.ops.combine.options",
    "CombineResult": "loratools.ops.combine.options",
    "ModuleCombine": "loratools.ops.combine.options",
    "combine_adapters": "loratools.ops.combine.api",
    "dare_merge": "loratools.ops.combine.methods.dare",
    "ties_merge": "loratools.ops.combine.methods.ties",
    "trim_magnitude": "loratools.ops.combine.methods.ties",
}

__all__ = [
    "CombineOptions",
    "CombineResult",
    "ModuleCombine",
    "combine_adapters",
    "dare_merge",
    "ties_merge",
    "trim_magnitude",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loratools.ops.combine' has no attribute {name!r}")
