"""Adapter kinds beyond plain LoRA, one per file (see docs/design.md).

Every kind implements :class:`loratools.adapter.ModuleWeight`: a 2-D update ΔW (out, in·kh·kw)
with an exact factored form ``scaled_factors() = (L, R)``, ``L @ R = ΔW``. Ops that need only ΔW
(merge of additive kinds, spectrum, resize, combine, convert) use that form and never ask which
kind a module is; :data:`KINDS` says what a kind is called and whether its update is additive.

- ``lora``  — :class:`loratools.adapter.LoraWeight` (conv LoRA / LoCon too, via ``weight_shape``)
- ``dora``  — a LoraWeight with a magnitude vector (:mod:`loratools.ops.dora`)
- ``loha``  — :class:`loratools.kinds.loha.LohaWeight`, ΔW = s·(B1·A1) ⊙ (B2·A2)
- ``lokr``  — :class:`loratools.kinds.lokr.LokrWeight`, ΔW = s·(W1 ⊗ W2)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "Kind", "kind_label", "register_kind"]


@dataclass(frozen=True)
class Kind:
    """An adapter kind's entry in the registry.

    Attributes:
        name: the ``ModuleWeight.kind`` string.
        label: what users read (``"LoHa"``).
        additive: ΔW does not depend on the base weight, so merge adds ``L @ R`` (DoRA: False).
    """

    name: str
    label: str
    additive: bool = True


KINDS: dict[str, Kind] = {
    "lora": Kind("lora", "LoRA"),
    "dora": Kind("dora", "DoRA", additive=False),
    "loha": Kind("loha", "LoHa"),
    "lokr": Kind("lokr", "LoKr"),
}


def register_kind(kind: Kind) -> None:
    """Add a kind to :data:`KINDS` (a new kind's module calls this once)."""
    KINDS[kind.name] = kind


def kind_label(name: str) -> str:
    """``"loha"`` → ``"LoHa"``; unknown names are returned as they are."""
    entry = KINDS.get(name)
    return entry.label if entry is not None else name
