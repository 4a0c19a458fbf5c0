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
from loratools.ops.moe import count_experts, is_router

__all__ = ["model_structure"]


def model_structure(
    shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Vocabulary size, added rows, tied embeddings and expert counts of a checkpoint.

    Args:
        shapes: tensor name → shape.
        config: the model's config.json contents, if any.

    Returns:
        ``{"vocab_size": rows of the input embedding, "config_vocab_size": …, "added_tokens": rows
        beyond the config's vocab_size (0 when not larger), "tied_embeddings": bool, "experts":
        {"base", "experts", "touched", …} or None, "routers": count}``.
    """
    config = config or {}
    lookup = [
        n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2 and embedding.is_lookup(n[:-7])
    ]
    rows = max((shapes[n][0] for n in lookup), default=None)
    declared = config.get("vocab_size")
    tied = bool(lookup) and (bool(tied_embeddings(shapes)) or bool(config.get("tie_word_embeddings", False)))
    experts = count_experts(shapes, [])
    return {
        "vocab_size": rows,
        "config_vocab_size": declared,
        "added_tokens": max(0, rows - declared) if isinstance(declared, int) and rows is not None else 0,
        "tied_embeddings": tied,
        "experts": None if experts is None else {"weights": experts.base, "experts": experts.experts},
        "routers": sum(1 for n in shapes if is_router(n)),
    }
