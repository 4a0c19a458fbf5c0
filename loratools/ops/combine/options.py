"""How to combine adapters (:class:`CombineOptions`), the output rank those options ask for, and
what the combination returns (:class:`CombineResult`, one :class:`ModuleCombine` per module)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loratools.adapter import Adapter
from loratools.errors import InvalidOptions
from loratools.linalg import RankRule, Split
from loratools.ops.combine.methods import METHODS

SavedPolicy = Literal["auto", "drop", "first"]
Pair = tuple[torch.Tensor, torch.Tensor]  # one adapter's folded factors (wᵢ·sᵢ·Bᵢ, Aᵢ): (d, rᵢ), (rᵢ, k)


@dataclass(frozen=True)
class CombineOptions:
    """How to combine adapters.

    Attributes:
        weights: one weight per adapter (negative negates, 0.5 halves); ``None`` means all 1.
        method: a name in :data:`loratools.ops.combine.methods.METHODS`: ``exact`` (default),
            ``svd`` (default when ``rank``/``energy`` is given), ``ties`` or ``dare``. Resolved in
            ``__post_init__``; the method checks the options it takes.
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
    method: str | None = None
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
        self.rank_rule.check(("rank", "energy"), required=False)
        problem = self._problem(method)
        if problem:
            raise InvalidOptions(problem)

    def _problem(self, method: str) -> str | None:
        if method not in METHODS:
            return f"unknown method {method!r}: use one of {', '.join(METHODS)}"
        density = self.density
        takers = [m.name for m in METHODS.values() if m.density]
        checks = [
            (not METHODS[method].density and density is not None, f"--density applies to {_listed(takers)}"),
            (density is not None and not 0 < density <= 1, f"density must be in (0, 1], got {density}"),
            (not all(map(math.isfinite, self.weights or ())), "weights must be finite numbers"),
            (self.saved_modules not in ("auto", "drop", "first"), "saved_modules: auto, drop or first"),
            (self.split not in ("sqrt", "b"), f"split must be 'sqrt' or 'b', got {self.split!r}"),
        ]
        return METHODS[method].problem(self) or next((message for failed, message in checks if failed), None)

    @property
    def rank_rule(self) -> RankRule:
        """The output rank rule: ``rank`` or ``energy`` (validated: raises ``InvalidOptions``)."""
        return RankRule(rank=self.rank, energy=self.energy)

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

    @property
    def method(self) -> str | None:
        return self.adapter.provenance.get("combine_method")

    @property
    def rank_total(self) -> int:
        return sum(m.rank for m in self.modules)

    @property
    def min_energy_kept(self) -> float:
        return min((m.energy_kept for m in self.modules), default=1.0)

    def summary(self) -> dict[str, Any]:
        """A JSON-able report (the CLI's ``--json`` document, less the output path)."""
        return {
            "method": self.method,
            "weights": self.adapter.provenance.get("weights"),
            "modules": [m.as_dict() for m in self.modules],
            "rank_total": self.rank_total,
            "min_energy_kept": self.min_energy_kept,
            "saved_modules": {"kept": self.saved_kept, "dropped": self.saved_dropped},
            "parameters": self.adapter.num_parameters,
        }


def _listed(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"
