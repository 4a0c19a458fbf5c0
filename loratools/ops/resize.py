"""Lowering an adapter's ranks optimally, without ever forming a dense d×k delta.

Each module's update is ``ΔW = s·B·A`` (B: d×r, A: r×k). Its exact SVD comes from QR(B), QR(Aᵀ)
and the SVD of an r×r core (:func:`loratools.linalg.factored_svd`, O((d + k)·r²)). By
Eckart–Young, keeping the top r' triplets is the best rank-r' approximation, and it keeps

    energy(r') = Σ_{i≤r'} σᵢ² / Σᵢ σᵢ² = 1 − ‖ΔW − ΔW_r'‖²_F / ‖ΔW‖²_F

of the module's squared Frobenius norm. Three ways to pick r' (exactly one per call):

- ``rank``:   r' = min(rank, r) for every module;
- ``energy``: the smallest r' with energy(r') ≥ F, per module;
- ``budget``: Σ r' ≤ N over all modules, given to the largest σᵢ² model-wide
  (:func:`loratools.linalg.allocate_budget`; greedy is optimal as each spectrum is descending).

A resized module gets ``alpha = r'`` (scale 1, no rsLoRA): the scale is folded into the factors.
Modules whose rank does not drop are kept bit-for-bit, with their own alpha and scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight, ModuleWeight
from loratools.errors import InvalidOptions
from loratools.linalg import RankRule, Split, Svd, energy_kept, factored_svd, lora_from_svd
from loratools.ops.dora import DORA_HOW, refuse_dora
from loratools.progress import Progress, no_progress

__all__ = [
    "ModuleResize",
    "ResizeOptions",
    "ResizeResult",
    "lycoris_to_lora",
    "resize_adapter",
]


@dataclass(frozen=True)
class ResizeOptions:
    """How to choose each module's new rank; exactly one of ``rank``, ``energy``, ``budget``.

    Attributes:
        rank: the same maximum rank for every module.
        energy: keep at least this fraction (0 < F ≤ 1) of each module's ‖ΔW‖²_F.
        budget: total rank over all modules, placed where the largest σᵢ² are.
        min_rank: with ``budget``, the rank every module keeps at least.
        split: how S is shared between the new factors (see :meth:`loratools.linalg.Svd.factors`).
        dtype: dtype of the new factors; ``None`` keeps each module's dtype.
        device: where the SVDs run (results come back to the CPU).
    """

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    min_rank: int = 1
    split: Split = "sqrt"
    dtype: torch.dtype | None = None
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        self.rank_rule.check(("rank", "energy", "budget"))
        if self.split not in ("sqrt", "b"):
            raise InvalidOptions(f"--split {self.split!r}: use 'sqrt' or 'b'")

    @property
    def rank_rule(self) -> RankRule:
        """The rank rule these options give (validated: raises ``InvalidOptions``)."""
        return RankRule(rank=self.rank, energy=self.energy, budget=self.budget, min_rank=self.min_rank)

    def record(self) -> dict[str, Any]:
        """The choices that changed the numbers, for the output's provenance."""
        return {"rank": self.rank, "energy": self.energy, "budget": self.budget, "split": self.split}


@dataclass(frozen=True)
class ModuleResize:
    """What happened to one module: its rank before and after, and the energy kept."""

    name: str
    rank_before: int
    rank: int
    energy_kept: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank_before": self.rank_before,
            "rank": self.rank,
            "energy_kept": self.energy_kept,
        }


@dataclass(frozen=True)
class ResizeResult:
    """The resized adapter and a per-module report."""

    adapter: Adapter
    modules: list[ModuleResize] = field(default_factory=list)

    @property
    def rank_total_before(self) -> int:
        return sum(m.rank_before for m in self.modules)

    @property
    def rank_total(self) -> int:
        return sum(m.rank for m in self.modules)

    @property
    def min_energy_kept(self) -> float:
        return min((m.energy_kept for m in self.modules), default=1.0)

    def summary(self) -> dict[str, Any]:
        """A JSON-able report (the CLI's ``--json`` document, less the output path)."""
        return {
            "modules": [m.as_dict() for m in self.modules],
            "rank_total_before": self.rank_total_before,
            "rank_total": self.rank_total,
            "min_energy_kept": self.min_energy_kept,
            "parameters": self.adapter.num_parameters,
        }


def _module_svd(weight: ModuleWeight, device: torch.device) -> Svd:
    b, a = weight.scaled_factors()  # (d, r) with the scale folded in, (r, k)
    return factored_svd(b.to(device), a.to(device))


def resize_adapter(
    adapter: Adapter, options: ResizeOptions, progress: Progress = no_progress
) -> ResizeResult:
    """Lower every module's rank optimally (truncated factored SVD), never raising one.

    Args:
        adapter: the adapter to resize.
        options: how to choose the ranks.
        progress: called with each module's name once its SVD is done.

    Returns:
        ResizeResult: the new adapter (provenance ``{"method": "resize", …, "input": old}``)
        and, per module, rank before/after and the energy kept.

    Raises:
        LoratoolsError: a budget too small for ``min_rank`` on every module.

    Example:
        >>> result = resize_adapter(adapter, ResizeOptions(energy=0.99))
        >>> [m.rank for m in result.modules]
    """
    refuse_dora(adapter, "resize", DORA_HOW)  # a DoRA update depends on W0, not only s·B·A
    device = torch.device(options.device)
    svds: dict[str, Svd] = {}
    for name, weight in adapter.weights.items():
        svds[name] = _module_svd(weight, device)
        progress(name)
    ranks = options.rank_rule.ranks({n: svd.s.cpu() for n, svd in svds.items()}, at_least=1)
    weights: dict[str, ModuleWeight] = {}
    report: list[ModuleResize] = []
    for name, weight in adapter.weights.items():
        new_rank = min(ranks[name], weight.rank)
        dtype = options.dtype or weight.dtype
        if new_rank >= weight.rank:  # nothing to cut: keep the factors exactly
            weights[name] = weight if dtype == weight.dtype else weight.to(dtype)
        else:
            new = lora_from_svd(svds[name], new_rank, options.split, dtype)
            # same layout: an embedding stays one, a conv keeps its kernel shape
            weights[name] = replace(
                new, embedding=getattr(weight, "embedding", False), weight_shape=weight.weight_shape
            )
        kept = energy_kept(svds[name].s, new_rank)
        report.append(ModuleResize(name, weight.rank, new_rank, kept))
    provenance = {"method": "resize", **options.record(), "input": dict(adapter.provenance)}
    return ResizeResult(replace(adapter, weights=weights, provenance=provenance), report)


# -- LoHa / LoKr → plain LoRA ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleConversion:
    """One module turned into a plain LoRA: its kind, the width of its exact factored form, the new
    rank, the energy kept and ``relative_error = ‖ΔW − B′A′‖_F / ‖ΔW‖_F = √(1 − energy kept)``."""

    name: str
    kind: str
    width: int
    rank: int
    energy_kept: float
    relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "rank": self.rank,
            "energy_kept": self.energy_kept,
            "relative_error": self.relative_error,
        }


def _singular_values(weight: ModuleWeight, device: torch.device) -> tuple[torch.Tensor, Svd | None]:
    """All singular values of ΔW, and its full SVD when that is what gave them: a LoKr module's
    come from its two small factors' SVDs (vectors built later, only as many as kept)."""
    from loratools.kinds.lokr import LokrWeight

    if isinstance(weight, LokrWeight):
        return weight.singular_values(), None
    svd = _module_svd(weight, device)
    return svd.s.cpu(), svd


def lycoris_to_lora(adapter: Adapter, options: ResizeOptions) -> tuple[Adapter, list[ModuleConversion]]:
    """Every LoHa/LoKr module (and every LoRA module above the rule's rank) as a plain LoRA.

    Each module's ΔW gets its exact SVD without being formed (LoKr: products of its factors'
    singular values and Kronecker products of their vectors; LoHa: the factored SVD of its
    Khatri–Rao form), so the rank-r truncation is the Eckart–Young optimum. Ranks follow
    ``options`` (rank / energy / budget, as in :func:`resize_adapter`); a conv keeps its kernel
    shape (``weight_shape``), so it is written as a conv LoRA.

    Returns:
        (the adapter, all modules plain LoRA with alpha = r; one record per module).
    """
    refuse_dora(adapter, "converting LoHa/LoKr to LoRA", DORA_HOW)
    device = torch.device(options.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # small SVDs: on a busy machine, OpenMP barriers cost ~1 s, 1 thread ~0.1 ms
        torch.set_num_threads(1)
    try:
        return _lycoris_to_lora(adapter, options, device)
    finally:
        torch.set_num_threads(threads)


def _lycoris_to_lora(
    adapter: Adapter, options: ResizeOptions, device: torch.device
) -> tuple[Adapter, list[ModuleConversion]]:
    spectra: dict[str, torch.Tensor] = {}
    svds: dict[str, Svd | None] = {}
    for name, weight in adapter.weights.items():
        spectra[name], svds[name] = _singular_values(weight, device)
    ranks = options.rank_rule.ranks(spectra, at_least=1)
    weights: dict[str, ModuleWeight] = {}
    report: list[ModuleConversion] = []
    for name, weight in adapter.weights.items():
        rank = min(ranks[name], int(spectra[name].numel()))
        dtype = options.dtype or weight.dtype
        if isinstance(weight, LoraWeight) and rank >= weight.rank:  # nothing to cut
            weights[name] = weight if dtype == weight.dtype else weight.to(dtype)
        else:
            svd = svds[name]
            if svd is None:  # LoKr: build only the kept vectors
                svd = weight.svd(rank)  # type: ignore[attr-defined]
            new = lora_from_svd(svd, max(rank, 1), options.split, dtype)
            weights[name] = replace(new, weight_shape=weight.weight_shape)
        kept = energy_kept(spectra[name], rank)
        error = max(0.0, 1.0 - kept) ** 0.5
        report.append(ModuleConversion(name, weight.kind, weight.rank, weights[name].rank, kept, error))
    provenance = {"method": "lycoris_to_lora", **options.record(), "input": dict(adapter.provenance)}
    return replace(adapter, weights=weights, provenance=provenance), report
