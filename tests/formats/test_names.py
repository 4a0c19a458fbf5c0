"""Matching adapter module names to base tensor names."""

from __future__ import annotations

import pytest

from loratools.errors import MissingKeys
from loratools.formats.names import resolve_modules, suffix_matches

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


def test_suffix_matches_start_at_a_separator_and_prefer_the_exact_name() -> None:
    linears = ["model.layers.0.q_proj", "layers.0.q_proj", "model.layers.10.q_proj"]
    assert suffix_matches("layers.0.q_proj", linears) == ["layers.0.q_proj"]  # exact wins
    assert suffix_matches("0.q_proj", linears) == ["model.layers.0.q_proj", "layers.0.q_proj"]
    assert suffix_matches("base_model.model.layers.10.q_proj", linears) == ["model.layers.10.q_proj"]
    assert suffix_matches("q_proj", ["model.layers.0.kq_proj"]) == []  # "kq_proj" does not end in ".q_proj"
    assert suffix_matches("te_mlp_fc1", {"layers_0_mlp_fc1": 0, "mlp_fc1": 1}, sep="_") == ["mlp_fc1"]
