"""A model folder's ``config.json``, read once for the facts commands need from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_model_config", "task_type", "tied_embeddings"]


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


def task_type(config: dict[str, Any]) -> str | None:
    """PEFT's task type for a model: ``CAUSAL_LM`` when ``architectures`` names a ``…ForCausalLM``."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        return None
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
