"""Matching adapter module names to base tensor names."""

from __future__ import annotations

import pytest

from loratools.errors import MissingKeys
from loratools.formats.names import resolve_modules

BASE = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.10.self_attn.q_proj.weight",
    "lm_head.weight",
]


def test_exact_then_unique_suffix_in_either_direction() -> None:
    resolved = resolve_modules(
        [
            "model.layers.0.self_attn.q_proj",
            "layers.1.self_attn.q_proj",
            "model.model.layers.10.self_attn.q_proj",
        ],
        BASE,
    )
    assert resolved == {
        "model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj.weight",
        "layers.1.self_attn.q_proj": "model.layers.1.self_attn.q_proj.weight",
        "model.model.layers.10.self_attn.q_proj": "model.layers.10.self_attn.q_proj.weight",
    }


def test_unresolved_and_ambiguous_names_are_reported_together() -> None:
    with pytest.raises(MissingKeys) as info:
        resolve_modules(
            ["self_attn.q_proj", "model.layers.5.self_attn.q_proj", "model.layers.0.self_attn.q_proj"], BASE
        )
    message = str(info.value)
    assert "2 adapter module(s) do not fit" in message
    assert "self_attn.q_proj.weight matches 3 base tensors" in message
    assert "model.layers.5.self_attn.q_proj.weight matches no base tensor" in message
