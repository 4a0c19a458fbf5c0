"""DoRA math on one module: the merged weight, the per-row norms, the effective update.

DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353) splits a weight into a magnitude and a
direction and adapts the direction with a LoRA. PEFT's definition, which this module follows::

    V  = W0 + s·B@A                        W0: (out, in), B: (out, r), A: (r, in)
    n  = ‖V‖_row = sqrt(Σ_j V[i, j]²)      (out,)  the norm per output feature, over the input dim
    W' = diag(m / n) · V                   m: (out,)  the stored magnitude (``lora_magnitude_vector``)

so the effective update ``ΔW = W' − W0`` is full-rank in general and depends on W0: a DoRA
adapter cannot be applied, spectrum-analysed or converted without its base. ``n`` is a number per
row that W' alone does not determine (W' fixes only ``m``), so undoing a merge needs ``n``
recorded (see ``loratools.io.dora_record``): ``V = W' · n / m`` and ``W0 = V − s·B@A``.

fan_in_fan_out bases store W0 as (in, out); everything here then works in that stored layout,
with the norm taken over dim 0 (still over the input features) and the scale applied per column.
All math runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight, ModuleWeight
from loratools.errors import LoratoolsError, list_problems

__all__ = [
    "DORA_HOW",
    "MagnitudeStats",
    "add_direction",
    "dora_modules",
    "dora_summary",
    "dora_weight",
    "effective_delta",
    "magnitude_stats",
    "refuse_dora",
    "row_norms",
    "scale_rows",
    "unscale_rows",
]


DORA_HOW = "bake it into a plain LoRA first: loratools convert ADAPTER --to peft -o DIR -r R --base BASE"


def dora_modules(adapter: Adapter) -> list[str]:
    """The adapter's DoRA modules (those with a magnitude vector), in order."""
    return [name for name, w in adapter.weights.items() if getattr(w, "magnitude", None) is not None]


def refuse_dora(adapter: Adapter, what: str, how: str, where: str = "adapter") -> None:
    """Raise a one-line error when ``adapter`` has DoRA modules that ``what`` cannot handle.

    Args:
        adapter: the adapter to check.
        what: the operation, e.g. ``"combine"``.
        how: how to fix it, e.g. ``"convert it to a plain LoRA first (loratools convert … --base)"``.
        where: the adapter's path, for the message.
    """
    names = dora_modules(adapter)
    if names:
        raise LoratoolsError(
            f"{where}: {len(names)} DoRA module(s) ({list_problems(names, 3)}); {what} handles plain "
            f"LoRA only, since a DoRA update depends on the base weight: {how}"
        )


def add_direction(
    v: torch.Tensor, weight: ModuleWeight, sign: float = 1.0, transposed: bool = False
) -> torch.Tensor:
    """``V += sign · s·B@A`` in place on a float32 (out, in) tensor (or (in, out) when transposed)."""
    b, a = weight.scaled_factors()  # (out, r) · s, (r, in)
    b, a = b.to(v.device), a.to(v.device)
    if transposed:
        return v.addmm_(a.T, b.T, alpha=sign)  # (in, out)
    return v.addmm_(b, a, alpha=sign)


def row_norms(v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """‖V‖ per output feature, float32 (out,): over dim 1, or dim 0 for a transposed layout."""
    return torch.linalg.vector_norm(v.float(), dim=0 if transposed else 1)


def _per_row(factor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return factor.view(1, -1) if transposed else factor.view(-1, 1)


def scale_rows(
    v: torch.Tensor, magnitude: torch.Tensor, norms: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """``V ← diag(m / n) · V`` in place (PEFT's ``dora_factor``), float32."""
    factor = magnitude.float().to(v.device) / norms.to(v.device)
    return v.mul_(_per_row(factor, transposed))


def unscale_rows(
    w: torch.Tensor, magnitude: torch.Tensor, norms: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """``V ← W' / (m / n)`` in place: the inverse of :func:`scale_rows` (PEFT's unmerge)."""
    factor = magnitude.float().to(w.device) / norms.to(w.device)
    return w.div_(_per_row(factor, transposed))


def dora_weight(
    w0: torch.Tensor, weight: LoraWeight, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged weight ``W' = diag(m / ‖W0 + s·B@A‖_row) · (W0 + s·B@A)`` and its norms.

    Args:
        w0: the base weight (out, in), or (in, out) when ``transposed``; any float dtype.
        weight: a DoRA module (``magnitude`` set).
        transposed: the base stores the weight as (in, out) (fan_in_fan_out).

    Returns:
        W' in float32 (w0's shape) and the norms n (out,) float32 that a merge must record.
    """
    if weight.magnitude is None:
        raise ValueError("dora_weight needs a DoRA module (magnitude set)")
    v = add_direction(w0.to(torch.float32, copy=True), weight, 1.0, transposed)
    norms = row_norms(v, transposed)
    return scale_rows(v, weight.magnitude, norms, transposed), norms


def effective_delta(w0: torch.Tensor, weight: LoraWeight, transposed: bool = False) -> torch.Tensor:
    """The update a module makes to its base, ``W' − W0`` in float32 (w0's shape).

    For plain LoRA that is ``s·B@A``; for DoRA it is full-rank in general and needs W0.
    """
    if weight.magnitude is None:
        delta = weight.delta()
        return delta.T if transposed else delta
    merged, _ = dora_weight(w0, weight, transposed)
    return merged.sub_(w0.float())


@dataclass(frozen=True)
class MagnitudeStats:
    """Summary of one module's magnitude vector m (and, with the base, of m / ‖W0‖_row).

    Attributes:
        name: module path.
        rows: out_features.
        min, max, mean, std: of m.
        change: with a base, statistics of m / ‖W0‖_row − 1 (how much DoRA rescales each
            output feature relative to the base), else None.
    """

    name: str
    rows: int
    min: float
    max: float
    mean: float
    std: float
    change: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "rows": self.rows, "min": self.min, "max": self.max,
            "mean": self.mean, "std": self.std,
        }  # fmt: skip
        if self.change is not None:
            out["relative_change"] = dict(self.change)
        return out


def magnitude_stats(
    name: str, weight: LoraWeight, w0: torch.Tensor | None = None, transposed: bool = False
) -> MagnitudeStats:
    """Statistics of ``weight.magnitude`` and, given the base weight, of ``m / ‖W0‖_row − 1``."""
    if weight.magnitude is None:
        raise ValueError(f"{name} is not a DoRA module")
    m = weight.magnitude.float()
    change = None
    if w0 is not None:
        ratio = m / row_norms(w0, transposed).clamp_min(torch.finfo(torch.float32).tiny) - 1.0
        change = {
            "mean": float(ratio.mean()),
            "mean_abs": float(ratio.abs().mean()),
            "max_abs": float(ratio.abs().max()),
        }
    std = float(m.std()) if m.numel() > 1 else 0.0
    return MagnitudeStats(name, m.numel(), float(m.min()), float(m.max()), float(m.mean()), std, change)


def dora_summary(
    adapter: Adapter, base: Callable[[str], torch.Tensor | None] | None = None
) -> dict[str, Any]:
    """``{"dora": {"modules": n, "magnitude": [per-module stats]}}`` for a DoRA adapter, else ``{}``.

    Args:
        adapter: the adapter.
        base: module name → its base weight (or None), for the relative change m / ‖W0‖_row − 1.
    """
    names = dora_modules(adapter)
    if not names:
        return {}
    stats = []
    for name in names:
        weight = adapter.weights[name]
        assert isinstance(weight, LoraWeight)
        w0 = base(name) if base is not None else None
        stats.append(magnitude_stats(name, weight, w0, adapter.fan_in_fan_out).to_dict())
    return {"dora": {"modules": len(names), "magnitude": stats}}
