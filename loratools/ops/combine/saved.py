"""``modules_to_save`` in a combination: whole replacement tensors, not deltas, so no weight can
apply to them. The policy (:class:`~loratools.ops.combine.options.CombineOptions` ``saved_modules``)
decides which copy the output keeps, or refuses."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, list_problems
from loratools.ops.combine.options import SavedPolicy


def combine_saved(
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
