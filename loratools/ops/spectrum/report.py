"""What spectra are computed with and what they come back as: options, per-module spectra, reports.

Per module, with σ₁ ≥ σ₂ ≥ … the singular values and ``E = ‖Δ‖²_F = Σ σᵢ²``:

- energy kept at rank r: ``e(r) = Σ_{i≤r} σᵢ² / E`` (the best rank-r approximation keeps exactly
  this, by Eckart–Young);
- effective rank at f: the smallest r with ``e(r) ≥ f`` (None when the computed top of the
  spectrum does not reach f);
- stable rank: ``E / σ₁² = ‖Δ‖²_F / ‖Δ‖²₂``, between 1 and rank(Δ).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from loratools import linalg
from loratools.errors import LoratoolsError
from loratools.ops.spectrum.amplification_factor import Amplification
from loratools.ops.spectrum.geometry import GeometryOptions, ModuleGeometry, direction_magnitude_correlation
from loratools.ops.spectrum.noise import NoiseFloor
from loratools.ops.spectrum.summary import ENERGY_LEVELS, summarize

__all__ = ["ModuleSpectrum", "SpectrumOptions", "SpectrumReport", "TensorSource"]


class TensorSource(Protocol):
    """What the ops need of a checkpoint (``loratools.io.checkpoint.Checkpoint`` fits)."""

    def names(self) -> list[str]: ...
    def info(self, name: str) -> Any: ...
    def iter_tensors(
        self, names: Iterable[str] | None = None, prefetch: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class SpectrumOptions:
    """How spectra are computed.

    Attributes:
        top: singular values per module for a full fine-tune's ΔW (randomized SVD); ignored for
            adapters, whose spectra are always complete.
        exact: full SVD of each ΔW instead (complete spectra; O(d·k·min(d, k)) each).
        include: a regular expression; only tensors whose name it matches (``re.search``) are
            compared in the BASE FINETUNED form. None: every 2-D tensor in both checkpoints.
        seed: seed of the randomized SVD sketch and of the random directions (amplification).
        device: where the math runs.
        geometry: which of magnitude/direction, rotation and intruder dimensions to add per module
            (they need the base weights: the BASE FINETUNED form, or an adapter with a base).
    """

    top: int = 64
    exact: bool = False
    include: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    geometry: GeometryOptions = field(default_factory=GeometryOptions)

    def __post_init__(self) -> None:
        if self.top < 1:
            raise LoratoolsError(f"--top {self.top}: must be at least 1")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as exc:
                raise LoratoolsError(f"--include {self.include!r}: not a regular expression ({exc})") from exc


@dataclass(frozen=True)
class ModuleSpectrum:
    """The spectrum of one module's update Δ (out × in).

    Attributes:
        name: module path (a tensor name without ``.weight``).
        shape: ``(out, in)``.
        singular_values: σ₁ ≥ σ₂ ≥ …, float64 on the CPU — all of them, or the top k.
        energy: ``‖Δ‖²_F``, exact even when ``singular_values`` is only the top of the spectrum.
        complete: ``singular_values`` holds every non-zero singular value.
        amplification: Section 7.3's measure, when a base model was given.
        geometry: magnitude/direction, rotation and intruders of W′ against W0, when asked for.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    energy: float
    complete: bool
    amplification: Amplification | None = None
    geometry: ModuleGeometry | None = None
    noise_floor: NoiseFloor | None = None  # a quantized base's rounding (ops/spectrum/noise.py)

    @property
    def stable_rank(self) -> float:
        """``‖Δ‖²_F / σ₁²``."""
        return linalg.stable_rank(self.singular_values, self.energy)

    def energy_at(self, rank: int) -> float | None:
        """``e(r) = Σ_{i≤r} σᵢ² / ‖Δ‖²_F``; None when r exceeds a truncated spectrum."""
        s = self.singular_values
        if rank > len(s) and not self.complete:
            return None
        if len(s) == 0 or self.energy <= 0:
            return 1.0
        return float(linalg.energy_curve(s[:rank], self.energy)[-1])

    def effective_rank(self, fraction: float) -> int | None:
        """Smallest r with ``e(r) ≥ fraction``; None when the computed top does not reach it."""
        s = self.singular_values
        if self.energy <= 0:
            return 0  # a zero update (an untrained adapter's B = 0) needs no rank at all
        r = linalg.rank_for_energy(s, fraction, self.energy)
        if not self.complete and r == len(s) and (self.energy_at(r) or 0.0) < fraction - 1e-12:
            return None
        return r

    def energy_ranks(self) -> list[int]:
        """The ranks 1, 2, 4, 8, … up to the computed spectrum's length."""
        ranks, r = [], 1
        while r <= len(self.singular_values):
            ranks.append(r)
            r *= 2
        return ranks

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "singular_values": self.singular_values.tolist(),
            "frobenius_norm": self.energy**0.5,
            "stable_rank": self.stable_rank,
            "effective_rank": {str(f): self.effective_rank(f) for f in ENERGY_LEVELS},
            "energy_at": {str(r): self.energy_at(r) for r in self.energy_ranks()},
            "complete": self.complete,
        }
        if self.amplification is not None:
            doc["amplification"] = self.amplification.to_dict()
        if self.geometry is not None:
            doc.update(self.geometry.to_dict())
        if self.noise_floor is not None:
            doc.update(self.noise_floor.to_dict())
        return doc


@dataclass(frozen=True)
class SpectrumReport:
    """Spectra of every module, plus what they were computed from.

    Attributes:
        source: ``"adapter"`` (Δ = s·B·A) or ``"checkpoints"`` (ΔW = W_ft − W_base).
        modules: one spectrum per module, in model order.
        unchanged: tensors whose ΔW is exactly zero (left out of ``modules``).
        skipped: tensors present in only one of the two checkpoints.
        settings: how the spectra were computed (for the record).
        experts: for a mixture of experts, expert weights with a spectrum vs in the base
            (:func:`loratools.ops.moe.experts_entry`); None otherwise or without a base.
    """

    source: str
    modules: list[ModuleSpectrum]
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """Grouped by module type and by layer, and model-wide (see :func:`summarize`)."""
        return summarize(self.modules, ENERGY_LEVELS)

    def direction_magnitude_correlation(self) -> float | None:
        """Pearson correlation of ΔD with ΔM across modules (DoRA paper, Figure 2), when measured."""
        points = [m.geometry.magnitude_direction for m in self.modules if m.geometry is not None]
        return direction_magnitude_correlation([p for p in points if p is not None])

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "source": self.source,
            "settings": self.settings,
            "modules": [m.to_dict() for m in self.modules],
            "summary": self.summary(),
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "experts": self.experts,
        }
        if any(m.geometry is not None and m.geometry.magnitude_direction for m in self.modules):
            doc["direction_magnitude_correlation"] = self.direction_magnitude_correlation()
        return doc
