"""What a fine-tune may change beyond the projections: vocabulary, tied embeddings, experts.

``inspect`` shows these so a user sees, before extracting or merging, whether embeddings are
tied (one matrix for input and lm_head), how many rows the embedding has against the config's
``vocab_size`` (rows beyond it are tokens added to a grown vocabulary), and how many expert weights
a mixture of experts holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loratools.kinds import embedding
from loratools.ops.extract.embeddings import tied_embeddings
from loratools.ops.moe import count_experts, fused_experts, is_router

__all__ = ["added_tokens", "model_structure"]


def model_structure(
    shapes: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any] | None,
    tokenizer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Vocabulary size, added tokens, tied embeddings and expert counts of a checkpoint.

    Args:
        shapes: tensor name → shape.
        config: the model's config.json contents, if any.
        tokenizer: the model's tokenizer.json contents, if any.

    Returns:
        ``{"vocab_size": rows of the input embedding, "config_vocab_size": …, "rows_beyond_config":
        rows past the config's vocab_size, "added_tokens": tokenizer.json ``added_tokens`` whose id
        is past the tokenizer model's own vocabulary (None without a tokenizer.json),
        "tied_embeddings": bool, "experts": {"weights", "experts"} or None, "routers": count}``.
    """
    config = config or {}
    lookup = [
        n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2 and embedding.is_lookup(n[:-7])
    ]
    rows = max((shapes[n][0] for n in lookup), default=None)
    declared = config.get("vocab_size")
    tied = bool(lookup) and (bool(tied_embeddings(shapes)) or bool(config.get("tie_word_embeddings", False)))
    experts = count_experts(shapes, [], fused=fused_experts(shapes))
    return {
        "vocab_size": rows,
        "config_vocab_size": declared,
        "rows_beyond_config": max(0, rows - declared)
        if isinstance(declared, int) and rows is not None
        else 0,
        "added_tokens": added_tokens(tokenizer),
        "tied_embeddings": tied,
        "experts": None if experts is None else {"weights": experts.base, "experts": experts.experts},
        "routers": sum(1 for n in shapes if is_router(n)),
    }


def added_tokens(tokenizer: Mapping[str, Any] | None) -> int | None:
    """How many of tokenizer.json's ``added_tokens`` lie past its model's own vocabulary (tokens
    that grew the vocabulary, not special tokens the model's vocabulary already has); None
    without a tokenizer."""
    if not isinstance(tokenizer, Mapping):
        return None
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, Mapping) else None
    size = len(vocab) if isinstance(vocab, (Mapping, list)) else 0
    entries = tokenizer.get("added_tokens") or []
    return sum(
        1 for t in entries if isinstance(t, Mapping) and isinstance(t.get("id"), int) and t["id"] >= size
    )
