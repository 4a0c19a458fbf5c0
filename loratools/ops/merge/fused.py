"""Merging into fused 3-D expert tensors: ``W[e] ← round(W0[e] + Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ)`` per expert.

A fused parameter W (E, p, q) holds every expert of one projection; an adapter's per-expert
modules (:class:`~loratools.kinds.fused.ExpertLora`) each adapt one slice W[e] (p, q). Each
touched slice goes through the same ``addmm`` and precision record as any 2-D tensor
(:func:`~loratools.ops.merge.update.apply_update`); untouched slices are only cast.
"""

from __future__ import annotations

import math

import torch

from loratools import linalg
from loratools.kinds.fused import ExpertLora
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.terms import TensorUpdate
from loratools.ops.merge.update import apply_update, stacked_factors

__all__ = ["apply_fused", "is_fused"]


def is_fused(update: TensorUpdate) -> bool:
    """Whether every LoRA term of ``update`` adapts one expert slice of a fused tensor."""
    return bool(update.loras) and all(isinstance(lora, ExpertLora) for lora, _, _ in update.loras)


def apply_fused(
    name: str, w0: torch.Tensor, update: TensorUpdate, out_dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ModuleStats]:
    """The merged fused tensor (E, p, q) in ``out_dtype`` and its precision record.

    The record's ‖Δ‖, lost and base-rounding norms are the root sums of squares of the touched
    slices' records; ‖W0‖ is the whole tensor's.
    """
    by_expert: dict[int, TensorUpdate] = {}
    for lora, weight, _ in update.loras:
        assert isinstance(lora, ExpertLora)  # is_fused() was checked by the caller
        by_expert.setdefault(lora.expert, TensorUpdate()).loras.append((lora, weight, False))
    out = w0.to(device=device, dtype=out_dtype, copy=True)
    records = []
    for expert, terms in sorted(by_expert.items()):
        left, right = stacked_factors(terms, device)  # (p, R), (R, q)
        out[expert], record = apply_update(f"{name}[{expert}]", w0[expert].to(device), left, right, out_dtype)
        records.append(record)

    def rss(values: list[float]) -> float:
        return math.sqrt(sum(v * v for v in values))

    stats = ModuleStats(
        name,
        tuple(w0.shape),
        str(out_dtype).removeprefix("torch."),
        adapters=len(update.loras),
        base_norm=linalg.frobenius(w0),
        delta_norm=rss([r.delta_norm for r in records]),
        lost_norm=rss([r.lost_norm for r in records]),
        base_round_norm=rss([r.base_round_norm for r in records]),
    )
    return out, stats
