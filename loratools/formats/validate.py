"""Checks every adapter passes when it is loaded, whatever its format: one place, one wording.

An adapter that loads must give the delta its files describe, or fail with one line that names
the file, what is wrong and what to do. PEFT fails (or silently skips modules) on the same
inputs, so these checks follow what PEFT itself would do with the config:

- ``lora_alpha`` / ``alpha_pattern`` values are finite numbers (not bool, str, None, list);
- ``r`` / ``rank_pattern`` values are positive integers, and each module's tensors have the
  rank they give (PEFT would refuse to load a state dict of another shape);
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes (PEFT matches ``(.*\\.)?(key)$``);
- ``target_modules`` selects every module that has tensors (PEFT would silently not load the
  others) — with ``exclude_modules``, ``modules_to_save`` and ``layers_to_transform`` as PEFT
  reads them;
- factors pair up, A (r, in) with B (out, r), r ≥ 1;
- every factor (and every other tensor a module holds) is finite: one ``isfinite`` pass over the
  small factors, so a NaN never reaches a merged model.

Format modules call :func:`check_pair` before building a module, :func:`config_alpha`,
:func:`config_rank`, :func:`config_flag`, :func:`config_patterns` while reading a config, and
:func:`check_adapter` on the finished :class:`~loratools.adapter.Adapter`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch

from loratools.errors import InvalidAdapter, list_problems
from loratools.formats.targets import peft_selects

__all__ = [
    "check_adapter",
    "check_pair",
    "check_ranks",
    "check_targets",
    "config_alpha",
    "config_flag",
    "config_patterns",
    "config_rank",
    "config_text",
    "scalar_alpha",
    "shown",
]

T = TypeVar("T")
FIX_ALPHA = "set it to a finite number such as 16"


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def config_alpha(value: Any, field: str, where: str) -> float:
    """A config's alpha as a float: an int or float that is finite.

    Raises:
        InvalidAdapter: bool, str, None, list, NaN, ±Inf — naming the field and the file.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidAdapter(f"{where}: {field} is {shown(value)}, not a number; {FIX_ALPHA}")
    if not math.isfinite(value):
        raise InvalidAdapter(
            f"{where}: {field} is {value}; {FIX_ALPHA} (the merged weights would be NaN/Inf)"
        )
    return float(value)


def config_rank(value: Any, field: str, where: str) -> int:
    """A config's rank: a positive integer (``8.0`` is read as 8).

    Raises:
        InvalidAdapter: not an integer, or below 1.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAdapter(
            f"{where}: {field} is {shown(value)}, not an integer; set it to the factors' rank"
        )
    if value < 1:
        raise InvalidAdapter(f"{where}: {field} is {value}; a LoRA rank must be at least 1")
    return value


def config_flag(value: Any, field: str, where: str) -> bool:
    """A true/false config field (absent or null means false).

    Raises:
        InvalidAdapter: any other value (the string ``"false"`` would silently read as true).
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidAdapter(f"{where}: {field} is {shown(value)}; it must be true or false")


def config_patterns(value: Any, field: str, where: str, check: Callable[[Any, str, str], T]) -> dict[str, T]:
    """A ``rank_pattern``/``alpha_pattern`` mapping: regex keys, values passed through ``check``.

    Raises:
        InvalidAdapter: not a mapping, a key that is not a valid regex, or a bad value.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidAdapter(f"{where}: {field} is {shown(value)}; it must map module-name regexes to values")
    patterns: dict[str, T] = {}
    for key, item in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, TypeError) as exc:
            raise InvalidAdapter(
                f"{where}: {field} key {shown(key)} is not a valid regex ({exc}); write a module name "
                "or a regex such as 'layers\\.0\\.self_attn\\.q_proj'"
            ) from None
        patterns[key] = check(item, f"{field}[{key!r}]", where)
    return patterns


def check_pair(module: str, a: torch.Tensor, b: torch.Tensor, where: str, names: tuple[str, str]) -> None:
    """Check that A (r, in, …) and B (out, r, …) make a LoRA of rank r ≥ 1.

    Args:
        module: the module, for the message.
        a, b: the down (A) and up (B) factors.
        where: the file, for the message.
        names: how the file calls A and B (``("lora_A", "lora_B")``, ``("lora_down", "lora_up")``).

    Raises:
        InvalidAdapter: factors of fewer than 2 dimensions, ranks that differ, or rank 0.
    """
    shapes = f"{names[0]} {list(a.shape)}, {names[1]} {list(b.shape)}"
    if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
        raise InvalidAdapter(
            f"{where}: {module}: {shapes} do not pair up ({names[0]} must be (r, in) and {names[1]} "
            "(out, r) with the same r); the file is damaged or not a LoRA, re-export it"
        )
    if a.shape[0] == 0:
        raise InvalidAdapter(
            f"{where}: {module}: rank 0 ({shapes}); remove the module or re-export the adapter"
        )


def scalar_alpha(tensor: torch.Tensor, name: str, where: str) -> float:
    """A stored alpha tensor (kohya ``<stem>.alpha``) as a float: one finite value.

    Raises:
        InvalidAdapter: several values (a vector alpha), or NaN/Inf.
    """
    if tensor.numel() != 1:
        raise InvalidAdapter(
            f"{where}: {name} holds {tensor.numel()} values (shape {list(tensor.shape)}); alpha must be "
            "one number (a 0-d tensor)"
        )
    value = float(tensor.float().reshape(()).item())
    if not math.isfinite(value):
        raise InvalidAdapter(f"{where}: {name} is {value}; {FIX_ALPHA} (the merged weights would be NaN/Inf)")
    return value


def check_targets(config: Mapping[str, Any], modules: Iterable[str], where: str) -> None:
    """Every module with tensors must be one PEFT would wrap, else PEFT silently drops it.

    ``target_modules`` absent, null or ``"all-linear"`` depends on the model class and is not
    checked.

    Raises:
        InvalidAdapter: a malformed ``target_modules``/``exclude_modules``/``modules_to_save``, or
            modules the config does not select (counted, first few named).
    """
    _check_names_field(config, "target_modules", where)
    _check_names_field(config, "exclude_modules", where)
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise InvalidAdapter(f"{where}: modules_to_save is {shown(saved)}; it must be a list of module names")
    _check_layers(config, where)
    target = config.get("target_modules")
    if target is None or target == "all-linear":
        return
    missed = [m for m in modules if not peft_selects(config, m)]
    if missed:
        raise InvalidAdapter(
            f"{where}: target_modules {shown(target)} does not select {len(missed)} module(s) that have "
            f"LoRA tensors ({list_problems(missed, 3)}); PEFT would silently skip them: add them to "
            "target_modules"
        )


def _check_names_field(config: Mapping[str, Any], field: str, where: str) -> None:
    value = config.get(field)
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise InvalidAdapter(f"{where}: {field} {shown(value)} is not a valid regex ({exc})") from None
    elif not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise InvalidAdapter(
            f"{where}: {field} is {shown(value)}; it must be a regex or a list of module names"
        )


def _check_layers(config: Mapping[str, Any], where: str) -> None:
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise InvalidAdapter(
            f"{where}: layers_to_transform is {shown(layers)}; it must be a layer index or a list of them"
        )
    _check_names_field(config, "layers_pattern", where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_text(value: Any, field: str, where: str) -> str | None:
    """An optional text field (``base_model_name_or_path``, ``task_type``).

    Raises:
        InvalidAdapter: a value that is neither text nor null.
    """
    if value is None or isinstance(value, str):
        return value
    raise InvalidAdapter(f"{where}: {field} is {shown(value)}; it must be text or null")


def check_ranks(ranks: Mapping[str, int], expected: Callable[[str], int], what: str, where: str) -> None:
    """Each module's tensor rank must be the rank the config gives it.

    Args:
        ranks: module → rank of its tensors.
        expected: module → the config's rank for it.
        what: how the message names the config fields (``"r/rank_pattern"``).
        where: the file.

    Raises:
        InvalidAdapter: every module whose tensors disagree, counted, first few named.
    """
    wrong = [f"{m} has rank {r}, config says {expected(m)}" for m, r in ranks.items() if r != expected(m)]
    if wrong:
        raise InvalidAdapter(
            f"{where}: {len(wrong)} module(s) disagree with {what} ({list_problems(wrong, 3)}); "
            "PEFT would refuse to load them: make the config's ranks match the tensors"
        )


def check_adapter(weights: Mapping[str, Any], where: str, names: Mapping[str, str] | None = None) -> None:
    """Every module's alpha is finite and every tensor it holds is finite (one pass over the factors).

    Works for any kind of module: each tensor field of its dataclass is checked. ``names`` maps
    field names to what the file calls them (``{"a": "lora_A", "b": "lora_B"}``) for the message.

    Raises:
        InvalidAdapter: modules with a non-finite alpha or NaN/Inf values, counted, first few named.
    """
    problems: list[str] = []
    for module, weight in weights.items():
        alpha = getattr(weight, "alpha", 0.0)
        if not math.isfinite(alpha):
            problems.append(f"{module} alpha {alpha}")
        for name, tensor in _tensors(weight):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                problems.append(
                    f"{module} {(names or {}).get(name, name)} ({bad} NaN/Inf of {tensor.numel()})"
                )
    if problems:
        raise InvalidAdapter(
            f"{where}: non-finite values in {len(problems)} place(s): {list_problems(problems, 3)}; the "
            "adapter is corrupt (a diverged training run?): retrain or re-export it"
        )


def _tensors(weight: Any) -> list[tuple[str, torch.Tensor]]:
    if not dataclasses.is_dataclass(weight):
        return []
    values = ((f.name, getattr(weight, f.name)) for f in dataclasses.fields(weight))
    return [(name, value) for name, value in values if isinstance(value, torch.Tensor)]
