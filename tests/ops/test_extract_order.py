"""extract's read order: stored order, with the tensors only compared or carried moved off the ends."""

from __future__ import annotations

from loratools.ops.extract.plan import Item
from loratools.ops.extract.stream import _overlapped


def _names(units: list[list[Item]]) -> list[str]:
    return [item.name for unit in units for item in unit]


def test_compared_tensors_are_read_between_factored_ones_not_at_the_ends() -> None:
    embed, q, norm, k, head = (
        Item("embed.weight", "embedding", (100, 8)),
        Item("q.weight", "lora", (8, 8)),
        Item("norm.weight", "other", (8,)),
        Item("k.weight", "lora", (8, 8)),
        Item("lm_head.weight", "embedding", (100, 8)),
    )
    units = [[embed], [q], [norm], [k], [head]]
    order = _overlapped(units)
    assert _names(order) == ["q.weight", "embed.weight", "norm.weight", "lm_head.weight", "k.weight"]
    assert sorted(_names(order)) == sorted(_names(units))  # every unit once


def test_fewer_than_two_factored_units_keep_the_stored_order() -> None:
    units = [[Item("embed.weight", "embedding", (10, 4))], [Item("q.weight", "lora", (4, 4))]]
    assert _overlapped(units) == units
