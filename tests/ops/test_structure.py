"""inspect's structure facts: vocabulary size, added rows, tied embeddings, expert counts."""

from __future__ import annotations

import json

from loratools.ops.structure import added_tokens, model_structure


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
        "rows_beyond_config": 2,
        "added_tokens": None,  # no tokenizer.json given
        "tied_embeddings": True,  # no lm_head.weight: the embedding is the output head too
        "experts": {"weights": 6, "experts": 3},
        "routers": 1,
    }
    untied = model_structure({**shapes, "lm_head.weight": (66, 8)}, {"vocab_size": 66})
    assert untied["tied_embeddings"] is False and untied["rows_beyond_config"] == 0


def test_added_tokens_are_those_past_the_tokenizer_models_vocabulary() -> None:
    tokenizer = {
        "model": {"vocab": {f"t{i}": i for i in range(64)}},
        "added_tokens": [{"id": 0, "content": "<unk>"}, {"id": 64, "content": "<|im_start|>"}, {"id": 65}],
    }
    assert added_tokens(tokenizer) == 2  # <unk> is in the model's vocabulary already
    assert added_tokens(None) is None


def test_inspect_json_has_the_structure(run_cli, fixtures_dir) -> None:
    result = run_cli("inspect", fixtures_dir / "base", "--json")
    assert result.exit_code == 0
    structure = json.loads(result.stdout)["structure"]
    assert (
        structure["vocab_size"] == 64
        and structure["tied_embeddings"] is False
        and structure["experts"] is None
    )


def test_inspect_reads_the_tokenizer_beside_the_weights(run_cli, fixtures_dir, tmp_path) -> None:
    import shutil

    folder = shutil.copytree(fixtures_dir / "base", tmp_path / "m")
    tokenizer = {"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 1}, {"id": 2}, {"id": 3}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["structure"]["added_tokens"] == 3
