"""Spectra summarised per group of modules: by module type, by layer, and model-wide.

Energies pool across a group's modules: with ``C_m(r) = Σ_{i≤r} σ_{m,i}²`` and ``E_m = ‖Δ_m‖²_F``,
the group keeps ``Σ_m C_m(r) / Σ_m E_m`` of its update at rank r on every module
(see :func:`group_summary`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # only for annotations: .report imports this module
    from loratools.ops.spectrum.report import ModuleSpectrum

__all__ = ["ENERGY_LEVELS", "group_summary", "layer_of", "module_type", "summarize"]

ENERGY_LEVELS = (0.9, 0.99)  # the effective ranks every report carries

_LAYER = re.compile(r"\.(\d+)\.")


def module_type(name: str) -> str:
    """The leaf of a module path: ``model.layers.3.self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> str:
    """The first number in a module path (its block), or ``"-"`` for modules outside the blocks."""
    match = _LAYER.search(name + ".")
    return match.group(1) if match else "-"


def summarize(modules: Sequence[ModuleSpectrum], levels: Sequence[float] = ENERGY_LEVELS) -> dict[str, Any]:
    """Group summaries by module type, by layer, and for the whole model (see :func:`group_summary`)."""
    by_type: dict[str, list[ModuleSpectrum]] = {}
    by_layer: dict[str, list[ModuleSpectrum]] = {}
    for m in modules:
        by_type.setdefault(module_type(m.name), []).append(m)
        by_layer.setdefault(layer_of(m.name), []).append(m)
    layers = sorted(by_layer, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    return {
        "by_type": {k: group_summary(v, levels) for k, v in by_type.items()},
        "by_layer": {k: group_summary(by_layer[k], levels) for k in layers},
        "model": group_summary(modules, levels),
    }


def _cumulative(modules: Sequence[ModuleSpectrum]) -> torch.Tensor:
    """``C[m, r-1] = Σ_{i≤r} σ_{m,i}²`` for r = 1…L (L the longest spectrum); a complete spectrum
    is extended by its total, a truncated one by NaN (unknown). Shape (M, L)."""
    length = max(len(m.singular_values) for m in modules)
    out = torch.full((len(modules), length), float("nan"), dtype=torch.float64)
    for row, m in enumerate(modules):
        cum = m.singular_values.double().square().cumsum(0)
        out[row, : len(cum)] = cum
        if m.complete:
            out[row, len(cum) :] = m.energy
    return out


def group_summary(
    modules: Sequence[ModuleSpectrum], levels: Sequence[float] = ENERGY_LEVELS
) -> dict[str, Any]:
    """What a group of modules needs, pooled: energies add across modules.

    - ``energy_at[r]``: ``Σ_m Σ_{i≤r} σ_{m,i}² / Σ_m ‖Δ_m‖²_F`` — the share of the group's update a
      rank-r LoRA on every module keeps (None past a truncated spectrum);
    - ``uniform_rank[f]``: the smallest such r keeping f;
    - ``total_rank[f]``: the smallest total rank (summed over modules, given to the largest σ²
      model-wide first) keeping f — what an energy-budgeted resize would need;
    - ``effective_rank_max`` / ``_median``: of the per-module effective ranks; ``stable_rank_mean``.
    """
    if not modules:
        return {"modules": 0}
    energy = sum(m.energy for m in modules)
    pooled = _cumulative(modules).sum(0) / energy if energy > 0 else torch.ones(1, dtype=torch.float64)
    ranks = [r for r in (2**i for i in range(32)) if r <= len(pooled)]
    squares = torch.cat([m.singular_values.double().square() for m in modules]).sort(descending=True).values
    budget = squares.cumsum(0) / energy if energy > 0 else torch.ones(1, dtype=torch.float64)
    doc: dict[str, Any] = {
        "modules": len(modules),
        "energy": energy,
        "stable_rank_mean": sum(m.stable_rank for m in modules) / len(modules),
        "energy_at": {str(r): _known(pooled[r - 1]) for r in ranks},
        "uniform_rank": {str(f): _first_reaching(pooled, f) for f in levels},
        "total_rank": {str(f): _first_reaching(budget, f) for f in levels},
    }
    for f in levels:
        effective = [m.effective_rank(f) for m in modules]
        known = sorted(e for e in effective if e is not None)
        complete = len(known) == len(effective)
        doc.setdefault("effective_rank_max", {})[str(f)] = known[-1] if complete else None
        doc.setdefault("effective_rank_median", {})[str(f)] = known[len(known) // 2] if complete else None
    return doc


def _known(value: torch.Tensor) -> float | None:
    return None if torch.isnan(value) else float(value)


def _first_reaching(curve: torch.Tensor, fraction: float) -> int | None:
    """1 + the first index where ``curve ≥ fraction`` (NaN never reaches); None if none does."""
    reached = torch.nonzero(curve >= fraction - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else None
