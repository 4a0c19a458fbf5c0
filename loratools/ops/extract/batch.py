"""Batched SVDs for the 2-D expert weights of one projection of one layer.

Mixtral's ``….experts.{0..E-1}.w1.weight`` (and Qwen-MoE's ``gate_proj``, …) share one shape, so
extract stacks their ΔW into one float32 (b, out, in) buffer and factors them with one batched
randomized SVD (:func:`~loratools.linalg.batched_randomized_svd`) instead of b separate calls.
The batch is one projection of one layer (same block, projection name and shape): memory grows
by that stack, about a third of a layer's experts, never a whole model. Everything else per
module — the rank rule, factors, the error report, a quantized base's noise floor — is as for
any 2-D module (:mod:`.factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from loratools.adapter import LoraWeight
from loratools.ops.extract.factor import ModuleReport, factor_from_svd, truncated_spectra
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import Item
from loratools.ops.moe import expert_group
from loratools.ops.spectrum.noise import NoiseFloor

__all__ = ["ExpertBatch", "StackBuffer", "read_units"]


def read_units(items: list[Item]) -> list[list[Item]]:
    """The items in the order to read them: the 2-D LoRA expert weights of one (block, projection,
    shape) as one unit, at the place of its first member; every other item a unit of its own."""
    units: list[list[Item]] = []
    groups: dict[tuple[str, str, tuple[int, ...]], list[Item]] = {}
    for item in items:
        group = expert_group(item.name) if item.kind == "lora" and len(item.shape) == 2 else None
        if group is None:
            units.append([item])
            continue
        key = (*group, item.shape)
        if key not in groups:
            groups[key] = []
            units.append(groups[key])
        groups[key].append(item)
    return units


class StackBuffer:
    """One float32 buffer, grown as needed and reused for every stack of ΔW (b, out, in)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flat = torch.empty(0, dtype=torch.float32, device=device)

    def stack(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised (count, *shape) view, valid until the next call."""
        n = count * math.prod(shape)
        if self.flat.numel() < n:
            self.flat = torch.empty(n, dtype=torch.float32, device=self.device)
        return self.flat[:n].view(count, *shape)


@dataclass
class ExpertBatch:
    """The changed members of one unit: their ΔW in ``stack``'s first rows, in arrival order.

    Attributes:
        stack: (len(unit), out, in) float32 (:meth:`StackBuffer.stack`).
        members: (item, ‖ΔW‖²_F, its noise floor) per row filled.
    """

    stack: torch.Tensor
    members: list[tuple[Item, float, NoiseFloor | None]] = field(default_factory=list)

    def add(self, item: Item, delta: torch.Tensor, total: float, floor: NoiseFloor | None) -> None:
        """Copy ΔW (a view of the shared delta buffer) into the next row."""
        self.stack[len(self.members)].copy_(delta)
        self.members.append((item, total, floor))

    def spectra(self, width: int, options: ExtractOptions) -> dict[str, torch.Tensor]:
        """Budget pass 1: each member's top ``width`` singular values, from one batched SVD."""
        if not self.members:
            return {}
        svds = truncated_spectra(self.stack[: len(self.members)], width, options)
        return {item.name: svd.s.cpu() for (item, _, _), svd in zip(self.members, svds, strict=True)}

    def factor(
        self, ranks: dict[str, int] | None, options: ExtractOptions, dtype: torch.dtype
    ) -> dict[str, tuple[LoraWeight, ModuleReport] | None]:
        """Every member factored from one batched SVD (None: the rank rule gave it rank 0).

        The SVD is as wide as the widest member needs (its own rank, for a budget); each member
        then takes its own rank from its own singular values, as a lone module would.
        """
        if not self.members:
            return {}
        width = options.width if ranks is None else max(ranks[item.name] for item, _, _ in self.members)
        svds = truncated_spectra(self.stack[: len(self.members)], width, options)
        out: dict[str, tuple[LoraWeight, ModuleReport] | None] = {}
        for row, ((item, total, floor), svd) in enumerate(zip(self.members, svds, strict=True)):
            rank = None if ranks is None else ranks[item.name]
            factored = factor_from_svd(item, self.stack[row], total, svd, rank, options, dtype)
            if factored is not None and floor is not None:
                factored = (factored[0], replace(factored[1], noise_floor=floor))
            out[item.name] = factored
        return out
