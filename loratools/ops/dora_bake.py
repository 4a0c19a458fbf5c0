"""DoRA → plain LoRA: factor each module's effective update ``ΔW = W' − W0`` at rank r.

llama.cpp, vLLM and TensorRT-LLM run plain LoRA only. A DoRA module's effective update
(see :mod:`loratools.ops.dora`)::

    ΔW = diag(m / ‖W0 + s·B@A‖_row) · (W0 + s·B@A) − W0        (out, in), full-rank in general

is computed from the base one module at a time and replaced by its best rank-r approximation
(Eckart–Young): the randomized SVD of :func:`loratools.linalg.randomized_svd` for ``-r R``
(within 1.01× of the optimal error, tested against a dense SVD), the exact SVD for
``--energy F`` (the smallest r keeping F of ‖ΔW‖²_F). The factors are written with alpha = r, so
scale = 1 and ``B @ A`` is the update itself. Per module the report gives the relative error
``‖ΔW − B@A‖_F / ‖ΔW‖_F`` and the energy kept ``Σ_{i≤r} σᵢ² / ‖ΔW‖²_F``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from loratools import linalg
from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError
from loratools.ops.dora import effective_delta

__all__ = ["BakedModule", "bake_adapter", "bake_module"]


@dataclass(frozen=True)
class BakedModule:
    """How well one module's effective update survived the rank cut."""

    name: str
    rank: int
    relative_error: float
    energy_kept: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "rank": self.rank, "relative_error": self.relative_error,
            "energy_kept": self.energy_kept,
        }  # fmt: skip


def _truncated(delta: torch.Tensor, rule: linalg.RankRule, seed: int) -> tuple[linalg.Svd, float]:
    """The truncated SVD of ΔW at the rule's rank, and ‖ΔW‖²_F.

    An energy rule needs the whole spectrum (the exact SVD); a fixed rank r only the top r
    (the randomized SVD, far cheaper on a full-rank d×k update)."""
    total = linalg.frobenius(delta) ** 2
    if rule.energy is not None:
        svd = linalg.exact_svd(delta)
        return svd.truncate(rule.choose(svd.s, total, at_least=1)), total
    assert rule.rank is not None  # _rule: exactly one of rank and energy
    return linalg.randomized_svd(delta, min(rule.rank, *delta.shape), niter=2, seed=seed), total


def bake_module(
    name: str,
    w0: torch.Tensor,
    weight: LoraWeight,
    *,
    transposed: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
) -> tuple[LoraWeight, BakedModule]:
    """A plain LoRA whose ``B @ A`` is the best rank-r approximation of the module's effective ΔW.

    Args:
        name: the module, for the report.
        w0: the base weight (out, in) — (in, out) when ``transposed`` (fan_in_fan_out).
        weight: a DoRA (or plain) module.
        transposed: the base stores the weight as (in, out).
        rank: the rank r; or
        energy: keep this fraction of ‖ΔW‖²_F with the smallest r.
        seed: the randomized SVD's seed.

    Returns:
        the LoRA module (A (r, in), B (out, r), alpha = r, in the dtype of ``weight``) and its report.
    """
    delta = effective_delta(w0, weight, transposed)
    delta = delta.T if transposed else delta  # (out, in): LoRA factors live in that layout
    svd, total = _truncated(delta, _rule(rank, energy), seed)
    b, a = svd.factors("sqrt")  # (out, r), (r, in)
    residual = linalg.frobenius(delta.addmm_(b, a, alpha=-1.0))
    norm = math.sqrt(total)
    kept = linalg.energy_kept(svd.s, svd.rank, total)
    lora = LoraWeight(a.contiguous(), b.contiguous(), float(svd.rank)).to(weight.dtype)
    return lora, BakedModule(name, svd.rank, residual / norm if norm > 0 else 0.0, kept)


def _rule(rank: int | None, energy: float | None) -> linalg.RankRule:
    """The one rank rule baking offers: -r R or --energy F (values checked by RankRule)."""
    rule = linalg.RankRule(rank=rank, energy=energy)
    rule.check(("rank", "energy"))
    return rule


def bake_adapter(
    adapter: Adapter,
    base: Iterable[tuple[str, torch.Tensor]],
    *,
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
) -> tuple[Adapter, list[BakedModule]]:
    """Every module of ``adapter`` as a plain LoRA of its effective update, streaming the base.

    Args:
        adapter: a DoRA adapter.
        base: (module name, base weight) pairs, one at a time, for every module of the adapter.
        rank, energy: the rank rule (exactly one).
        seed: the randomized SVD's seed.

    Returns:
        the plain-LoRA adapter and the per-module report.

    Raises:
        InvalidOptions: neither or both rank rules, or a value out of range.
        LoratoolsError: a module the base did not provide.
    """
    _rule(rank, energy)  # refused before the first module is read
    weights: dict[str, LoraWeight] = {}
    report: list[BakedModule] = []
    for name, w0 in base:
        weight = adapter.weights[name]
        if not isinstance(weight, LoraWeight):
            raise LoratoolsError(f"{name}: a {weight.kind} module; only DoRA and LoRA modules bake")
        weights[name], record = bake_module(
            name, w0, weight, transposed=adapter.fan_in_fan_out, rank=rank, energy=energy, seed=seed
        )
        report.append(record)
    missing = [m for m in adapter.weights if m not in weights]
    if missing:
        raise LoratoolsError(f"the base has no weight for {len(missing)} module(s), e.g. {missing[0]}")
    rule = {"rank": rank} if rank is not None else {"energy": energy}
    baked = adapter.with_weights({m: weights[m] for m in adapter.weights}, baked_from_dora=rule)
    return baked, report
