"""A model folder's ``config.json``, read once for the facts commands need from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_model_config", "tied_embeddings"]


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    """The ``config.json`` beside a checkpoint (in its folder, or next to a single file); ``{}`` when
    there is none or it is not a JSON object — a missing config is not an error for a checkpoint."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether lm_head shares the input embedding (transformers' default is True when unset,
    but configs that matter set it; an absent key is read as not tied, to never invent a tie)."""
    value = config.get("tie_word_embeddings")
    text_config = config.get("text_config")
    if value is None and isinstance(text_config, dict):
        value = text_config.get("tie_word_embeddings")
    return value is True
