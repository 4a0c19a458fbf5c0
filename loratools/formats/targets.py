"""Which modules PEFT wraps: ``target_modules`` matching, written once (PEFT's
``check_target_module_exists``).

- a string is a regex that must match the whole module name (``re.fullmatch``);
- a list selects a module named exactly as an entry, or ending in ``"." + entry``
  (``q_proj`` and ``self_attn.q_proj`` select ``model.layers.0.self_attn.q_proj``; ``proj`` does
  not: a suffix starts at a dot).

:func:`matches_target` is that rule; :func:`peft_selects` adds what an ``adapter_config.json``
can say besides (``exclude_modules``, ``modules_to_save``, ``layers_to_transform``). Extraction,
training, the PEFT writer, the load checks and the Hub checks all call these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["matches_target", "peft_selects"]


def matches_target(module: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: regex full match for a string, exact name or ``.``-suffix match for a list."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith(f".{t}") for t in targets)


def peft_selects(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would wrap ``module`` with this config (``check_target_module_exists``).

    ``target_modules`` and ``exclude_modules`` follow :func:`matches_target`; modules under
    ``modules_to_save`` are never wrapped; ``layers_to_transform`` keeps only those layer indices
    (not for a regex, nor for a module a list names exactly, as in PEFT). Callers have already
    checked that every value is of the right type.
    """
    exclude = config.get("exclude_modules")
    if exclude and matches_target(module, exclude):
        return False
    saved = config.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in saved):
        return False
    target = config.get("target_modules")
    if isinstance(target, str):
        return matches_target(module, target)
    if module in (target or []):
        return True  # named exactly: PEFT skips the layers_to_transform check
    return matches_target(module, target or []) and _in_layers(config, module)


def _in_layers(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's ``layers_to_transform``: the first numbered part after ``layers_pattern`` (or any part)."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (re.match(r, module) for r in regexes) if m), None)
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers
