"""Mixture-of-experts accounting: which expert weights a command touched, against the base.

A merge that silently applies 3 of 60 expert deltas looks like success. So every expert weight
is counted, by name, on both sides. On disk, Mixtral and Qwen2-MoE checkpoints (also those
transformers 5 writes, whose in-memory layout is fused) store one 2-D weight per expert::

    model.layers.N.block_sparse_moe.experts.E.w1.weight      (Mixtral: w1, w2, w3)
    model.layers.N.mlp.experts.E.gate_proj.weight            (Qwen2-MoE: gate/up/down_proj)

and a router per layer (``…block_sparse_moe.gate.weight``, ``…mlp.gate.weight``, Qwen2-MoE's
``…mlp.shared_expert_gate.weight``): (num_experts, hidden), small, carried whole.

gpt-oss stores each projection's experts fused, one 3-D tensor (E, ·, ·) without ``.weight``::

    model.layers.N.mlp.experts.gate_up_proj        (E, hidden, 2·inter), and down_proj

counted as E expert weights each (``fused``: name → E, from :func:`fused_experts`); an adapter's
module for one of them is ``….experts.gate_up_proj[e]`` (:mod:`loratools.kinds.fused`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loratools.errors import LoratoolsError, list_problems
from loratools.kinds.fused import FUSED_NAME

__all__ = [
    "ExpertCount",
    "adapter_experts",
    "check_no_expert_dropped",
    "count_experts",
    "expert_group",
    "experts_entry",
    "fused_experts",
    "is_expert",
    "is_fused_expert",
    "is_router",
    "merged_experts",
]

EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<index>\d+)\.(?P<proj>.+)\.weight$")
FUSED = re.compile(r"^(?P<block>.+\.experts)\.(?P<proj>[^.]+)$")  # ….experts.gate_up_proj (E, ·, ·)
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)\.weight$")


def is_expert(name: str) -> bool:
    """Whether tensor ``name`` is one expert's 2-D weight (``….experts.3.w1.weight``)."""
    return EXPERT.match(name) is not None


def is_fused_expert(name: str, shape: tuple[int, ...]) -> bool:
    """Whether tensor ``name`` of ``shape`` holds one projection of all experts (E, p, q), not a bias."""
    return len(shape) == 3 and FUSED.match(name) is not None and not name.endswith("_bias")


def expert_group(name: str) -> tuple[str, str] | None:
    """(block, projection) of one expert's 2-D weight (``….experts``, ``w1``); None for other tensors.
    The experts of one projection of one layer share a shape: extract factors them as one batch."""
    match = EXPERT.match(name)
    return (match["block"], match["proj"]) if match else None


def fused_experts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Fused expert tensors of a base (``….experts.<proj>``, 3-D, not a bias) → their expert count E."""
    return {n: int(s[0]) for n, s in shapes.items() if is_fused_expert(n, tuple(s))}


def is_router(name: str) -> bool:
    """Whether tensor ``name`` is a router (``….gate.weight``; not ``gate_proj``)."""
    return ROUTER.search(name) is not None and not is_expert(name)


@dataclass(frozen=True)
class ExpertCount:
    """How many expert weights a command touched, of how many the base has.

    Attributes:
        base: expert 2-D weights in the base.
        experts: distinct experts (layer block + index) in the base.
        touched: expert weights the command changed (factored, merged, …).
        dropped: expert weights whose change would be lost, by name (must be empty to succeed).
        routers: router weights carried whole (their names).
    """

    base: int
    experts: int
    touched: int
    dropped: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "experts": self.experts,
            "touched": self.touched,
            "dropped": list(self.dropped),
            "routers": list(self.routers),
        }


def count_experts(
    base_names: Iterable[str],
    touched: Iterable[str],
    dropped: Iterable[str] = (),
    routers: Iterable[str] = (),
    fused: Mapping[str, int] | None = None,
) -> ExpertCount | None:
    """Count expert weights; None when the base has none (not a mixture of experts).

    Args:
        base_names: every tensor name of the base.
        touched: tensor names the command changed (``param[e]`` for a fused tensor's expert e).
        dropped: tensor names whose change the command would lose (a fused tensor by its name:
            counted, and listed, as its E experts ``name[e]``).
        routers: router tensor names carried whole.
        fused: the base's fused expert tensors → E (:func:`fused_experts`); each counts E weights.
    """
    fused = fused or {}
    experts = [n for n in base_names if is_expert(n)]
    if not experts and not fused:
        return None
    groups = set()
    for name in experts:
        match = EXPERT.match(name)
        assert match is not None
        groups.add((match["block"], match["index"]))
    for name, count in fused.items():
        groups.update((name.rpartition(".")[0], str(e)) for e in range(count))
    slices = {f"{name}[{e}]" for name, count in fused.items() for e in range(count)}
    return ExpertCount(
        base=len(experts) + len(slices),
        experts=len(groups),
        touched=sum(1 for n in set(touched) if is_expert(n) or n in slices),
        dropped=sorted(  # a dropped fused tensor loses each of its E experts
            {n for n in dropped if is_expert(n)}
            | {f"{n}[{e}]" for n in dropped if n in fused for e in range(fused[n])}
        ),
        routers=sorted(set(routers)),
    )


def check_no_expert_dropped(count: ExpertCount | None, fix: str) -> None:
    """Refuse to finish when an expert's change would be lost.

    Raises:
        LoratoolsError: the dropped expert weights, named, with ``fix``.
    """
    if count is not None and count.dropped:
        raise LoratoolsError(
            f"{len(count.dropped)} of {count.base} expert weights changed but would be dropped: "
            f"{list_problems(count.dropped)}; {fix}"
        )


def merged_experts(
    base_names: Iterable[str], updates: Mapping[str, Any], fused: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """The ``experts`` entry of a merge report: expert weights an adapter changed vs in the base.

    A merge cannot drop an expert's factors (a module that fits no base tensor is an error before
    anything is written), so ``dropped`` stays empty; routers replaced whole are listed.

    Args:
        base_names: the base's tensor names.
        updates: base tensor name → its update (``loras``: factor terms; ``replacement``: whole).
        fused: the base's fused expert tensors → E; their touched slices are counted one by one.
    """
    touched = [n for n, u in updates.items() if getattr(u, "loras", None)]
    touched += [  # an expert slice of a fused tensor (kinds/fused.py ExpertLora)
        f"{n}[{lora.expert}]"
        for n, u in updates.items()
        for lora, _, _ in getattr(u, "loras", [])
        if hasattr(lora, "expert")
    ]
    routers = [n for n, u in updates.items() if is_router(n) and getattr(u, "replacement", None) is not None]
    count = count_experts(base_names, touched, routers=routers, fused=fused)
    return count.to_dict() if count is not None else None


def experts_entry(base_names: Iterable[str], touched: Iterable[str]) -> dict[str, Any] | None:
    """The ``experts`` entry of a report: expert weights ``touched`` vs in the base; None when the
    base has no experts."""
    count = count_experts(base_names, touched)
    return count.to_dict() if count is not None else None


def adapter_experts(
    modules: Iterable[str], base_shapes: Mapping[str, tuple[int, ...]] | None
) -> dict[str, Any] | None:
    """The ``experts`` entry of inspect: the expert weights an adapter adapts, against the base's
    when given (2-D experts and fused tensors' experts ``param[e]`` counted one by one); without a
    base only ``{"touched": n}``. None when the adapter adapts no expert (and the base has none)."""
    touched = [m if FUSED_NAME.match(m) else f"{m}.weight" for m in modules]
    if base_shapes is None:
        count = sum(1 for n in touched if is_expert(n) or FUSED_NAME.match(n))
        return {"touched": count} if count else None
    found = count_experts(list(base_shapes), touched, fused=fused_experts(base_shapes))
    return found.to_dict() if found is not None else None
