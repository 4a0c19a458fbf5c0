"""The precision record of a merge: per adapted tensor, and for the whole output.

Per tensor (Δ = Σ wᵢsᵢBᵢAᵢ, computed from the factors)::

    relative_delta = ‖Δ‖_F / ‖W0‖_F
    lost_fraction  = ‖round(W0 + Δ) − W0 − Δ‖_F / ‖Δ‖_F         output dtype = W0's (or wider)
                   = 1 − ⟨round(W0+Δ) − round(W0), Δ⟩ / ‖Δ‖²    output dtype narrower than W0's
    base_rounding  = ‖round(W0) − W0‖_F / ‖Δ‖_F                   (narrower only; else None)

In the same dtype W0 is exact and each element loses at most |Δ|, so lost_fraction ≤ 1. In a
narrower dtype the cast moves W0 itself (base_rounding, the same for a plain cast without any
adapter) and adds rounding noise to the update; what counts as lost is the share of Δ missing
from the output on average (clipped to [0, 1]), not the noise. For the output the same ratios
of root-sum-squares over every adapted tensor. When more than ``lost_warning`` of the update
is lost, the report says so and how to keep it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from loratools.ops.merge.plan import MergePlan
from loratools.ops.merge.terms import MergeOptions, MergeTerm


@dataclass(frozen=True)
class ModuleStats:
    """The precision record of one adapted tensor (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    adapters: int
    base_norm: float
    delta_norm: float
    lost_norm: float
    base_round_norm: float = 0.0  # ‖round(W0) − W0‖ when the output dtype is narrower than W0's
    # --keep-quantization only: ‖Q(W0+Δ) − Q(W0)‖ / ‖Δ‖ and cos(Q(W0+Δ) − Q(W0), Δ)
    survival: float | None = None
    direction: float | None = None
    # unmerge/swap from a quantized model: ‖Q(W) − W‖ / ‖Δ‖ of the output W, about how far it
    # is from the original base (the merged model's own rounding, which cannot be undone)
    quantization_error: float | None = None

    @property
    def base_rounding(self) -> float | None:
        """‖round(W0) − W0‖ / ‖Δ‖: how far casting the base alone moves it, in units of the update."""
        if self.base_round_norm == 0.0:
            return None
        return self.base_round_norm / self.delta_norm if self.delta_norm > 0 else math.inf

    @property
    def relative_delta(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.inf

    @property
    def lost_fraction(self) -> float:
        return self.lost_norm / self.delta_norm if self.delta_norm > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "adapters": self.adapters,
            "relative_delta": self.relative_delta,
            "lost_fraction": self.lost_fraction,
            "base_rounding": self.base_rounding,
            **({"survival": self.survival, "direction": self.direction} if self.survival is not None else {}),
            **({"quantization_error": q} if (q := self.quantization_error) is not None else {}),
        }


@dataclass(frozen=True)
class MergeResult:
    """What a merge/unmerge/swap did, with its precision record (``to_dict`` is the --json shape
    less the output, which the command's report, :class:`loratools.commands.merge.MergeResult`, adds)."""

    operation: str
    adapters: list[dict[str, Any]]
    dtype: str | None
    modules: list[ModuleStats]
    replaced: list[str]
    copied: int
    files: list[str]
    warnings: list[str]
    lost_warning: float = 0.5
    experts: dict[str, Any] | None = None  # a mixture of experts: expert weights merged vs in the base
    dora_record: str | None = None  # where the DoRA norms record went (ops/merge/dora.py)

    @property
    def relative_delta(self) -> float:
        base = math.sqrt(sum(m.base_norm**2 for m in self.modules))
        return math.sqrt(sum(m.delta_norm**2 for m in self.modules)) / base if base > 0 else math.nan

    @property
    def lost_fraction(self) -> float:
        """The share of the whole update lost to rounding: √Σ‖lostᵢ‖² / √Σ‖Δᵢ‖²."""
        delta = math.sqrt(sum(m.delta_norm**2 for m in self.modules))
        return math.sqrt(sum(m.lost_norm**2 for m in self.modules)) / delta if delta > 0 else math.nan

    @property
    def effect_vanishes(self) -> bool:
        return self.lost_fraction > self.lost_warning

    @property
    def base_rounding(self) -> float | None:
        """√Σ‖round(W0ᵢ) − W0ᵢ‖² / √Σ‖Δᵢ‖² over the tensors cast to a narrower dtype, else None."""
        narrowed = [m for m in self.modules if m.base_round_norm > 0]
        delta = math.sqrt(sum(m.delta_norm**2 for m in narrowed))
        if not narrowed:
            return None
        return math.sqrt(sum(m.base_round_norm**2 for m in narrowed)) / delta if delta > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "adapters": self.adapters,
            "dtype": self.dtype,
            "merged": len(self.modules),
            "replaced": self.replaced,
            "copied": self.copied,
            "files": self.files,
            "precision": {
                "relative_delta": self.relative_delta,
                "lost_fraction": self.lost_fraction,
                "effect_vanishes": self.effect_vanishes,
                "base_rounding": self.base_rounding,
                "modules_mostly_lost": sum(m.lost_fraction > self.lost_warning for m in self.modules),
            },
            "modules": [m.to_dict() for m in self.modules],
            "warnings": self.warnings,
            "experts": self.experts,
            **({"dora_record": self.dora_record} if self.dora_record else {}),
        }


def build_result(
    operation: str,
    terms: Sequence[MergeTerm],
    options: MergeOptions,
    plan: MergePlan,
    stats: list[ModuleStats],
    files: list[str],
    total: int,
) -> MergeResult:
    """The result of a finished pass over ``total`` base tensors, with the precision warnings."""
    adapters = [
        {
            "path": t.label,
            "weight": t.weight,
            "modules": len(t.adapter.weights),
            "saved_modules": len(t.adapter.saved_modules),
            "base_model": t.adapter.base_model,
        }
        for t in terms
    ]
    replaced = [name for name, u in plan.updates.items() if u.replacement is not None]
    dtype = str(options.dtype).removeprefix("torch.") if options.dtype else None
    report = MergeResult(
        operation, adapters, dtype, stats, replaced, total - len(plan.updates), files,
        list(plan.warnings), options.lost_warning,
    )  # fmt: skip
    kept = any(m.survival is not None for m in stats)  # --keep-quantization: its own warning
    warn = survival_warnings if kept else precision_warnings
    return replace(report, warnings=report.warnings + warn(report) + quantized_unmerge_warnings(report))


def precision_warnings(report: MergeResult) -> list[str]:
    """Warnings in plain words: the update as a whole, or most of some modules' updates, rounds
    away; or casting the base to a narrower dtype moves it more than the adapters do."""
    dtypes = sorted({m.dtype for m in report.modules})
    names = "/".join(dtypes)
    hint = "" if dtypes == ["float32"] else "; merge with --dtype float32 to keep it"
    if report.effect_vanishes:
        step = max(_step(d) for d in dtypes)
        return [
            f"rounding to {names} erases {report.lost_fraction:.0%} of the adapters' change to the weights: "
            f"the change is about {report.relative_delta:.1e} of the weights' size, finer than {names} "
            f"stores (its steps are about {step:.2%} of each weight){hint}"
        ]
    lost = [m.name for m in report.modules if m.lost_fraction > report.lost_warning]
    if lost:
        return [
            f"{len(lost)} of {len(report.modules)} module(s) lose most of their change to rounding to "
            f"{names} (e.g. {lost[0]}){hint}"
        ]
    noise = report.base_rounding
    if noise is not None and noise > 1.0:
        return [
            f"casting the base to {names} moves its weights {noise:.3g}× as far as the adapters do (a plain "
            f"cast without adapters does the same); the adapters' change itself is kept "
            f"({1 - report.lost_fraction:.0%} on average); merge in the base's own dtype to avoid the cast"
        ]
    return []


def _step(dtype: str) -> float:
    """Half the relative spacing of ``dtype``'s numbers: the most one rounding moves a weight."""
    return float(torch.finfo(getattr(torch, dtype)).eps) / 2


def quantized_unmerge_warnings(report: MergeResult) -> list[str]:
    """Adapters removed from a quantized model: the result is the base only up to its rounding."""
    errors = sorted((q, m.name) for m in report.modules if (q := m.quantization_error) is not None)
    if not errors:
        return []
    median, (worst, name) = errors[len(errors) // 2][0], errors[-1]
    return [
        f"{report.operation} from a quantized model is exact only up to its quantization: the output "
        f"differs from the original base by about {median:.2g}× the removed update (median over "
        f"{len(errors)} module(s); {worst:.2g}× in {name}), see quantization_error in --json"
    ]


def survival_warnings(report: MergeResult, named: int = 8) -> list[str]:
    """A loud warning naming the modules whose update mostly vanished on requantization: the part
    of Q(W0+Δ) − Q(W0) along Δ, ``survival · direction``, below 1 − ``lost_warning`` of ‖Δ‖."""
    floor = 1.0 - report.lost_warning
    lost = [m for m in report.modules if m.survival is not None and m.survival * (m.direction or 0.0) < floor]
    if not lost:
        return []
    lost.sort(key=lambda m: m.survival or 0.0)
    names = ", ".join(f"{m.name} (kept {m.survival:.0%}, cos {m.direction:.2f})" for m in lost[:named])
    more = f" and {len(lost) - named} more" if len(lost) > named else ""
    return [
        f"MOST OF THE UPDATE IS LOST requantizing {len(lost)} of {len(report.modules)} module(s) to "
        f"{'/'.join(sorted({m.dtype for m in lost}))}: {names}{more}; write a float output instead "
        "(merge without --keep-quantization, e.g. --dtype bfloat16) or apply the adapter at run time"
    ]
