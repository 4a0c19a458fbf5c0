"""Pre-upload validation of a PEFT adapter folder: would PEFT load it as its config describes?

No network: ``push`` runs :func:`check_adapter_folder` before it talks to the Hub, so a broken
adapter is refused locally with every problem listed at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loratools.adapter import Adapter
from loratools.errors import CheckpointError, ShapeMismatch, list_problems
from loratools.formats import peft
from loratools.formats.targets import matches_target

__all__ = ["check_adapter_folder"]


def check_adapter_folder(folder: str | Path) -> Adapter:
    """Load a PEFT adapter folder and check that PEFT could load it as its config describes.

    Checks, all collected before raising once: the weights pair up as A (r, in) / B (out, r);
    each module's rank is the one ``r``/``rank_pattern`` give it; ``target_modules`` selects every
    adapted module; ``lora_alpha`` and all tensor values are finite.

    Raises:
        CheckpointError: not a local PEFT folder, or unreadable files.
        ShapeMismatch: shapes that disagree with each other or with the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; push takes a local PEFT adapter folder")
    if not (folder / peft.CONFIG_NAME).is_file() or not (folder / peft.WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{folder}: needs {peft.CONFIG_NAME} and {peft.WEIGHTS_NAME} (a PEFT adapter saved with safetensors)"
        )
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.filekind import read_adapter_config

    try:
        adapter = load_adapter(folder)
    except ValueError as exc:  # LoraWeight refuses A/B that do not pair up
        raise ShapeMismatch(f"{folder}: {exc}; the adapter is broken, re-save it") from exc
    config = read_adapter_config(folder / peft.CONFIG_NAME)  # load_adapter parsed it already
    problems = _config_problems(adapter, config) + _value_problems(adapter)
    if problems:
        raise ShapeMismatch(
            f"{folder}: refusing to push a broken adapter: {list_problems(problems)}; "
            "fix adapter_config.json or re-save the adapter"
        )
    return adapter


def _config_problems(adapter: Adapter, config: Mapping[str, Any]) -> list[str]:
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return [f"adapter_config.json: r must be a positive integer, got {r!r}"]
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        return [f"adapter_config.json: lora_alpha must be a finite number, got {alpha!r}"]
    if not adapter.weights:
        return ["no lora_A/lora_B tensors"]
    problems = []
    rank_pattern = config.get("rank_pattern") or {}
    targets = config.get("target_modules")
    for name, weight in adapter.weights.items():
        expected = peft.pattern_value(rank_pattern, name, r)
        if weight.rank != expected:
            problems.append(f"{name} has rank {weight.rank} but the config gives it r={expected}")
        if not (isinstance(targets, (str, list)) and matches_target(name, targets)):
            problems.append(f"{name} is not selected by target_modules={targets!r} (PEFT would ignore it)")
    return problems


def _value_problems(adapter: Adapter) -> list[str]:
    import torch

    bad = [
        name
        for name, w in adapter.weights.items()
        if not all(torch.isfinite(t).all() for t in w.scaled_factors())
    ]
    bad += [
        name
        for name, t in adapter.saved_modules.items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    return [f"{name} holds NaN or infinite values" for name in bad]
