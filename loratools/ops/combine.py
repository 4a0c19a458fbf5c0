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
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.linalg import Split, exact_svd, factored_svd_sum, randomized_svd, rank_for_energy
from loratools.ops import Progress, no_progress
from loratools.ops.resize import energy_kept, lora_from_svd

__all__ = [
    "CombineOptions",
    "CombineResult",
    "ModuleCombine",
    "combine_adapters",
    "dare_merge",
    "ties_merge",
    "trim_magnitude",
]

Method = Literal["exact", "svd", "ties", "dare"]
SavedPolicy = Literal["auto", "drop", "first"]
METHODS = ("exact", "svd", "ties", "dare")
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CombineOptions:
    """How to combine adapters.

    Attributes:
        weights: one weight per adapter (negative negates, 0.5 halves); ``None`` means all 1.
        method: ``exact`` (default), ``svd`` (default when ``rank``/``energy`` is given), ``ties``
            or ``dare``. Resolved in ``__post_init__``.
        rank: the output rank per module (svd, ties, dare); capped by what the sum has.
        energy: instead of ``rank``, keep at least this fraction of each module's ‖ΔW‖²_F.
        density: ties: fraction of each delta's entries kept (largest magnitudes);
            dare: probability of keeping each entry (survivors rescaled by 1/density).
        seed: seeds DARE's masks (per module, mixed with the module name) and the randomized SVD.
        split: how S is shared between the new factors (svd, ties, dare).
        saved_modules: ``auto`` keeps a ``modules_to_save`` tensor when every adapter carrying it
            has weight 1 and all copies are identical, and refuses otherwise; ``first`` keeps the
            first adapter's copy unweighted; ``drop`` leaves them all out.
        dtype: output dtype; ``None`` keeps the inputs' dtype (float32 when they differ).
        device: where the math runs (results come back to the CPU).
    """

    weights: tuple[float, ...] | None = None
    method: Method | None = None
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    seed: int = 0
    split: Split = "sqrt"
    saved_modules: SavedPolicy = "auto"
    dtype: torch.dtype | None = None
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        truncating = self.rank is not None or self.energy is not None
        method = self.method or ("svd" if truncating else "exact")
        object.__setattr__(self, "method", method)  # resolve the default once
        problem = self._problem(method, truncating)
        if problem:
            raise ValueError(problem)

    def _problem(self, method: str, truncating: bool) -> str | None:
        rank, energy, density = self.rank, self.energy, self.density
        checks = [
            (method not in METHODS, f"unknown method {method!r}: use one of {', '.join(METHODS)}"),
            (rank is not None and energy is not None, "give -r/--rank or --energy, not both"),
            (rank is not None and rank < 1, f"rank must be at least 1, got {rank}"),
            (energy is not None and not 0 < energy <= 1, f"energy must be in (0, 1], got {energy}"),
            (method == "exact" and truncating, "the exact method keeps every rank; drop -r/--energy"),
            (method != "exact" and not truncating, f"--method {method} needs -r RANK or --energy F"),
            (method in ("ties", "dare") and density is None, f"--method {method} needs --density D"),
            (method in ("exact", "svd") and density is not None, "--density applies to ties and dare"),
            (density is not None and not 0 < density <= 1, f"density must be in (0, 1], got {density}"),
            (not all(map(math.isfinite, self.weights or ())), "weights must be finite numbers"),
            (self.saved_modules not in ("auto", "drop", "first"), "saved_modules: auto, drop or first"),
            (self.split not in ("sqrt", "b"), f"split must be 'sqrt' or 'b', got {self.split!r}"),
        ]
        return next((message for failed, message in checks if failed), None)

    def record(self, weights: Sequence[float]) -> dict[str, Any]:
        """The choices that changed the numbers, for the output's provenance."""
        return {
            "combine_method": self.method,
            "weights": list(weights),
            "rank": self.rank,
            "energy": self.energy,
            "density": self.density,
            "seed": self.seed,
            "split": self.split,
        }


@dataclass(frozen=True)
class ModuleCombine:
    """One output module: its rank, the energy of the combined delta it keeps, its inputs."""

    name: str
    rank: int
    energy_kept: float
    sources: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "energy_kept": self.energy_kept,
            "sources": self.sources,
        }


@dataclass(frozen=True)
class CombineResult:
    """The combined adapter, a per-module report, and what happened to saved modules."""

    adapter: Adapter
    modules: list[ModuleCombine] = field(default_factory=list)
    saved_kept: list[str] = field(default_factory=list)
    saved_dropped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able report (the CLI's ``--json`` document, less the output path)."""
        return {
            "method": self.adapter.provenance.get("combine_method"),
            "weights": self.adapter.provenance.get("weights"),
            "modules": [m.as_dict() for m in self.modules],
            "rank_total": sum(m.rank for m in self.modules),
            "min_energy_kept": min((m.energy_kept for m in self.modules), default=1.0),
            "saved_modules": {"kept": self.saved_kept, "dropped": self.saved_dropped},
            "parameters": self.adapter.num_parameters,
        }


# ---- element-wise methods on dense deltas (n, d, k) ---------------------------------------------


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


# ---- one module -------------------------------------------------------------------------------


def _folded(
    items: list[tuple[int, LoraWeight]], weights: Sequence[float], device: torch.device
) -> list[Pair]:
    """``(wᵢ·sᵢ·Bᵢ, Aᵢ)`` per adapter, float32 on ``device``; the weight goes into B only."""
    pairs = []
    for i, weight in items:
        b, a = weight.scaled_factors()  # (d, rᵢ), (rᵢ, k)
        pairs.append(((b * weights[i]).to(device), a.to(device)))
    return pairs


def _pick_rank(s: torch.Tensor, options: CombineOptions) -> int:
    if options.energy is not None:
        return max(1, rank_for_energy(s, options.energy))
    assert options.rank is not None  # guaranteed by CombineOptions.__post_init__
    return min(options.rank, int(s.numel()))


def _combine_module(
    name: str, pairs: list[Pair], options: CombineOptions, dtype: torch.dtype
) -> tuple[LoraWeight, float]:
    """The combined LoraWeight of one module and the fraction of the combined delta's energy it keeps."""
    if options.method == "exact":
        b = torch.cat([b for b, _ in pairs], dim=1)  # (d, R)
        a = torch.cat([a for _, a in pairs], dim=0)  # (R, k)
        return LoraWeight(a.to("cpu", dtype), b.to("cpu", dtype), float(a.shape[0])), 1.0
    if options.method == "svd":
        svd = factored_svd_sum(pairs)
        rank = _pick_rank(svd.s, options)
        return lora_from_svd(svd, rank, options.split, dtype), energy_kept(svd.s, rank)
    return _dense_module(name, pairs, options, dtype)


def _dense_module(
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
        rank = _pick_rank(svd.s, options)
    else:
        assert options.rank is not None
        rank = min(options.rank, *merged.shape)
        svd = randomized_svd(merged, rank, seed=options.seed)
    kept = float(svd.s[:rank].double().square().sum()) / total if total > 0 else 1.0
    return lora_from_svd(svd, rank, options.split, dtype), kept


# ---- the whole adapter ------------------------------------------------------------------------


def _gather(adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, LoraWeight]]]:
    groups: dict[str, list[tuple[int, LoraWeight]]] = {}
    for i, adapter in enumerate(adapters):
        for name, weight in adapter.weights.items():
            groups.setdefault(name, []).append((i, weight))
    return groups


def _check_compatible(
    adapters: Sequence[Adapter], groups: dict[str, list[tuple[int, LoraWeight]]], labels: list[str]
) -> None:
    """Refuse, listing every conflict at once, modules whose delta shapes differ between adapters."""
    conflicts = []
    for name, items in groups.items():
        if len({w.shape for _, w in items}) > 1:
            shapes = ", ".join(f"{labels[i]} {w.shape[0]}×{w.shape[1]}" for i, w in items)
            conflicts.append(f"{name} ({shapes})")
    if conflicts:
        raise ShapeMismatch(
            f"{len(conflicts)} module(s) have different shapes in different adapters: "
            f"{list_problems(conflicts)}; combine only adapters made for the same base model"
        )
    layouts = {a.fan_in_fan_out for a in adapters}
    if len(layouts) > 1:
        raise ShapeMismatch(
            "some adapters set fan_in_fan_out and some do not; they were made for different base models"
        )


def _combine_saved(
    adapters: Sequence[Adapter], weights: Sequence[float], policy: SavedPolicy, labels: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ``modules_to_save`` tensors the output keeps, and the names it drops."""
    copies: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, adapter in enumerate(adapters):
        for name, tensor in adapter.saved_modules.items():
            copies.setdefault(name, []).append((i, tensor))
    if policy == "drop":
        return {}, list(copies)
    if policy == "first":
        return {name: items[0][1] for name, items in copies.items()}, []
    problems = []
    for name, items in copies.items():
        weighted = [f"{labels[i]} has weight {weights[i]:g}" for i, _ in items if weights[i] != 1]
        if weighted:
            problems.append(f"{name}: {', '.join(weighted)}")
        elif any(not torch.equal(items[0][1], t) for _, t in items[1:]):
            problems.append(f"{name}: differs between {', '.join(labels[i] for i, _ in items)}")
    if problems:
        raise LoratoolsError(
            f"cannot combine modules_to_save (whole tensors, not deltas, so they cannot be weighted or "
            f"summed): {list_problems(problems)}; pass --saved-modules first (keep the first copy) "
            "or --saved-modules drop"
        )
    return {name: items[0][1] for name, items in copies.items()}, []


def _output_dtype(adapters: Sequence[Adapter], options: CombineOptions) -> torch.dtype:
    if options.dtype is not None:
        return options.dtype
    dtypes = {w.dtype for a in adapters for w in a.weights.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _base_model(adapters: Sequence[Adapter]) -> str | None:
    names = list(dict.fromkeys(a.base_model for a in adapters if a.base_model))
    if len(names) > 1:
        warnings.warn(
            f"the adapters name different base models ({', '.join(names)}); using {names[0]}", stacklevel=3
        )
    return names[0] if names else None


def combine_adapters(
    adapters: Sequence[Adapter],
    options: CombineOptions,
    *,
    sources: Sequence[str] | None = None,
    progress: Progress = no_progress,
) -> CombineResult:
    """Combine adapters into one: ``ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ`` per module, exactly or at a lower rank.

    Args:
        adapters: the inputs, in order (weights match by position).
        options: method, weights, rank/energy, density, seed, …
        sources: names of the inputs (paths) for messages and provenance.
        progress: called with each module's name once it is done.

    Returns:
        CombineResult with the new adapter (base model, task type and extra config of the first
        input; provenance ``{"method": "combine", "combine_method", "weights", …, "inputs"}``).

    Raises:
        ValueError: no adapters, or a weight count that does not match.
        ShapeMismatch: a module whose shape differs between adapters (all conflicts listed).
        LoratoolsError: modules_to_save that cannot be combined under ``options.saved_modules``.

    Example:
        >>> negated = combine_adapters([adapter], CombineOptions(weights=(-1.0,))).adapter
        >>> merged = combine_adapters([a1, a2], CombineOptions(rank=16)).adapter
    """
    if not adapters:
        raise ValueError("combine needs at least one adapter")
    weights = list(options.weights) if options.weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(
            f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per adapter"
        )
    labels = list(sources) if sources is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    groups = _gather(adapters)
    _check_compatible(adapters, groups, labels)
    saved, dropped = _combine_saved(adapters, weights, options.saved_modules, labels)
    dtype, device = _output_dtype(adapters, options), torch.device(options.device)
    out: dict[str, LoraWeight] = {}
    report = []
    for name, items in groups.items():
        out[name], kept = _combine_module(name, _folded(items, weights, device), options, dtype)
        report.append(ModuleCombine(name, out[name].rank, kept, [i for i, _ in items]))
        progress(name)
    inputs = [
        {"source": label, "provenance": dict(a.provenance)} for label, a in zip(labels, adapters, strict=True)
    ]
    first = adapters[0]
    combined = Adapter(
        weights=out,
        saved_modules=saved,
        base_model=_base_model(adapters),
        task_type=first.task_type,
        fan_in_fan_out=first.fan_in_fan_out,
        extra_config=dict(first.extra_config),
        provenance={"method": "combine", **options.record(weights), "inputs": inputs},
    )
    return CombineResult(combined, report, sorted(saved), sorted(dropped))
