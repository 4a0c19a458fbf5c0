"""inspect's structure facts: vocabulary size, added rows, tied embeddings, expert counts."""

from __future__ import annotations

import json

from loratools.ops.structure import model_structure


def test_grown_vocabulary_tied_embeddings_and_experts() -> None:
    shapes = {
        "model.embed_tokens.weight": (66, 8),  # two tokens added to a 64-token vocabulary
        "model.layers.0.mlp.gate.weight": (3, 8),
        **{
            f"model.layers.0.mlp.experts.{e}.{p}.weight": (4, 8)
            for e in range(3)
            for p in ("gate_proj", "up_proj")
        },
        "model.norm.weight": (8,),
    }
    facts = model_structure(shapes, {"vocab_size": 64})
    assert facts == {
        "vocab_size": 66,
        "config_vocab_size": 64,
        "added_tokens": 2,
        "tied_embeddings": True,  # no lm_head.weight: the embedding is the output head too
        "experts": {"weights": 6, "experts": 3},
        "routers": 1,
    }
    untied = model_structure({**shapes, "lm_head.weight": (66, 8)}, {"vocab_size": 66})
    assert untied["tied_embeddings"] is False and untied["added_tokens"] == 0


def test_inspect_json_has_the_structure(run_cli, fixtures_dir) -> None:
    result = run_cli("inspect", fixtures_dir / "base", "--json")
    assert result.exit_code == 0
    structure = json.loads(result.stdout)["structure"]
    assert (
        structure["vocab_size"] == 64
        and structure["tied_embeddings"] is False
        and structure["experts"] is None
    )
