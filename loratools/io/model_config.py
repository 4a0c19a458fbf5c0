"""A model folder's ``config.json`` (and ``tokenizer.json``), read here only: the one place outside
io/ that wants them gets the parsed dict, never a path to open."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratools.errors import CheckpointError

__all__ = [
    "model_class",
    "read_json_object",
    "read_model_config",
    "require_model_config",
    "task_type",
    "tied_embeddings",
]


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    """The ``config.json`` beside a checkpoint (in its folder, or next to a single file); ``{}`` when
    there is none or it is not a JSON object — a missing config is not an error for a checkpoint."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def require_model_config(folder: Path) -> dict[str, Any]:
    """``folder``/config.json, which the caller cannot do without (the built-in model is shaped by it).

    Raises:
        CheckpointError: no readable config.json, or one that is not a JSON object.
    """
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable Llama-family config.json ({exc!r})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a readable Llama-family config.json (not a JSON object)")
    return config


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file such as ``tokenizer.json``; None when absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def model_class(config: dict[str, Any]) -> str | None:
    """The model class ``architectures`` names first (the layout of fused expert tensors depends on it)."""
    architectures = config.get("architectures") or []
    return str(architectures[0]) if isinstance(architectures, list) and architectures else None
