"""Planning: match every adapter to the base and check it fits, before anything is written.

Every problem is collected (unresolved names, shape or dtype misfits, clashing replacements)
and raised once; a base model name that differs from the adapter's record is only a warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.errors import (
    LoratoolsError,
    MissingKeys,
    ShapeMismatch,
    UnknownFormat,
    list_problems,
    name_summary,
)
from loratools.formats.detect import FileKind
from loratools.formats.names import resolve_modules, suffix_matches
from loratools.kinds.fused import ExpertLora
from loratools.ops.merge.growth import grows, lora_on_grown, restore_base_layer
from loratools.ops.merge.terms import FLOAT_DTYPES, MergeTerm, TensorInfo, TensorUpdate

if TYPE_CHECKING:
    from loratools.ops.merge.dora import DoraPlan

Problems = list[tuple[type[LoratoolsError], str]]  # (error class, one-line description)


@dataclass
class MergePlan:
    """Base tensor name → its update, plus warnings found while planning."""

    updates: dict[str, TensorUpdate]
    warnings: list[str]
    dora: DoraPlan | None = None  # tensors DoRA touches, and the norms record (ops/merge/dora.py)


def _misfit(problems: Problems, message: str) -> None:
    problems.append((ShapeMismatch, message))


def _resolve(names: list[str], base_names: list[str], label: str, problems: Problems) -> dict[str, str]:
    """Resolve names one by one (exact, else a unique suffix: ``formats.names.suffix_matches``) so
    that every unresolved name is reported, not just the first batch."""
    base = dict.fromkeys(base_names)  # O(1) exact test
    resolved = {}
    for name in names:
        matches = suffix_matches(name, base)
        if len(matches) == 1:
            resolved[name] = matches[0]
        else:
            why = f"matches {len(matches)} base tensors" if matches else "matches no base tensor"
            problems.append((MissingKeys, f"{label}: {name} {why}"))
    return resolved


def _fits(weight_shape: tuple[int, ...] | None, shape: tuple[int, ...], expected: tuple[int, int]) -> bool:
    """An (out, in) update fits its tensor; a conv's (out, in·kh·kw) update fits an (out, in, kh, kw)
    kernel (LoCon, conv LoHa/LoKr), unless the adapter states another kernel shape."""
    if len(shape) <= 2:
        return shape == expected
    return (shape[0], math.prod(shape[1:])) == expected and weight_shape in (None, shape)


def _plan_loras(
    term: MergeTerm, infos: Mapping[str, TensorInfo], updates: dict[str, TensorUpdate], problems: Problems
) -> None:
    adapter, label = term.adapter, term.label
    base_names = list(infos)
    modules = [m for m in adapter.modules if not _plan_expert(term, m, infos, updates, problems)]
    try:
        targets = resolve_modules(modules, base_names)
    except MissingKeys:
        names = _resolve([f"{m}.weight" for m in modules], base_names, label, problems)
        targets = {m: names[f"{m}.weight"] for m in modules if f"{m}.weight" in names}
    seen: dict[str, str] = {}
    for module, target in targets.items():
        lora, info = adapter.weights[module], infos[target]
        # fan_in_fan_out (Conv1D) transposes linear deltas; an embedding keeps (num_embeddings, dim)
        transposed = adapter.fan_in_fan_out and not getattr(lora, "embedding", False)
        expected = (lora.shape[1], lora.shape[0]) if transposed else lora.shape
        if target in seen:
            _misfit(problems, f"{label}: {module} and {seen[target]} both adapt {target}")
        elif not _fits(lora.weight_shape, tuple(info.shape), expected):
            _misfit(
                problems,
                f"{label}: {module} makes a {list(expected)} update but {target} is {list(info.shape)}",
            )
        elif info.dtype not in FLOAT_DTYPES:
            _misfit(problems, f"{label}: {target} is {info.dtype}, not a float tensor")
        else:
            updates.setdefault(target, TensorUpdate()).loras.append((lora, term.weight, transposed))
        seen[target] = module


def _plan_expert(
    term: MergeTerm,
    module: str,
    infos: Mapping[str, TensorInfo],
    updates: dict[str, TensorUpdate],
    problems: Problems,
) -> bool:
    """Plan one expert slice of a fused (E, p, q) tensor (``param[e]``, resolved when the adapter
    was read against this base); False for any other module."""
    lora = term.adapter.weights[module]
    if not isinstance(lora, ExpertLora) or lora.param is None:
        return False
    info = infos.get(lora.param.name)
    if info is None or tuple(info.shape) != lora.param.shape:
        shape = list(lora.param.shape)
        _misfit(problems, f"{term.label}: {module} adapts a fused {shape} tensor the base lacks")
    elif info.dtype not in FLOAT_DTYPES:
        _misfit(problems, f"{term.label}: {lora.param.name} is {info.dtype}, not a float tensor")
    else:
        updates.setdefault(lora.param.name, TensorUpdate()).loras.append((lora, term.weight, False))
    return True


def _plan_saved(
    terms: Sequence[MergeTerm],
    infos: Mapping[str, TensorInfo],
    updates: dict[str, TensorUpdate],
    problems: Problems,
) -> list[str]:
    """Whole-tensor replacements (modules_to_save); returns warnings."""
    warnings: list[str] = []
    removed: dict[str, str] = {}  # base tensor → label of the adapter that removes its replacement
    replaced_by: dict[str, str] = {}  # base tensor → label of the adapter that replaces it
    for term in terms:
        saved = term.adapter.saved_modules
        names = _resolve(list(saved), list(infos), term.label, problems)
        if names and term.weight > 0 and term.weight != 1.0:
            warnings.append(
                f"{term.label}: modules_to_save replace tensors whole; --weight does not scale them"
            )
        for name, target in names.items():
            tensor, info = saved[name], infos[target]
            grown = term.weight > 0 and grows(target, tuple(tensor.shape), tuple(info.shape))
            if tuple(tensor.shape) != tuple(info.shape) and not grown:  # only a vocabulary may grow
                _misfit(
                    problems,
                    f"{term.label}: saved module {name} is {list(tensor.shape)} but {target} is {list(info.shape)}",
                )
            elif term.weight < 0 and name.removesuffix(".weight") in term.adapter.weights:
                # PEFT's copy of the base layer under its LoRA: removing the adapter restores it
                restore_base_layer(updates.setdefault(target, TensorUpdate()), tensor, term.adapter, name)
            elif term.weight < 0:
                removed[target] = term.label
            elif target in replaced_by:
                _misfit(
                    problems,
                    f"{term.label} and {replaced_by[target]} both replace {target} (modules_to_save)",
                )
            else:
                replaced_by[target] = term.label
                updates.setdefault(target, TensorUpdate()).replacement = tensor
    for target, label in removed.items():
        if target not in replaced_by:
            _misfit(
                problems,
                f"{label}: replaces {target} whole (modules_to_save), so removing it cannot restore the "
                "original; merge into the original base instead",
            )
    return warnings


def _base_model_warnings(terms: Sequence[MergeTerm], base_ids: Sequence[str]) -> list[str]:
    """A different base model recorded in an adapter's config is worth a warning, not a refusal."""
    known = {Path(str(b).rstrip("/")).name.lower() for b in base_ids if b}
    warnings: list[str] = []
    if not known:
        return warnings
    for term in terms:
        recorded = term.adapter.base_model
        if recorded and Path(recorded.rstrip("/")).name.lower() not in known:
            warnings.append(f"{term.label} was made for base model {recorded!r}, not {base_ids[0]!r}")
    return warnings


UNRESOLVED = " matches no base tensor"


def _compact(problems: Problems, terms: Sequence[MergeTerm]) -> str:
    """The problems in one short line: per adapter, its path once, the names that match no base
    tensor as a count with their common prefix and the first few, other problems (first few),
    and the base model the adapter records."""
    labels = sorted({t.label for t in terms}, key=len, reverse=True)  # longest first: a/b before a
    grouped: dict[str, list[str]] = {}
    for _, message in problems:
        label = next((lb for lb in labels if message.startswith(f"{lb}: ")), "")
        grouped.setdefault(label, []).append(message.removeprefix(f"{label}: ") if label else message)
    recorded = {t.label: t.adapter.base_model for t in terms}
    parts = []
    for label, messages in grouped.items():
        missing = [m.removesuffix(UNRESOLVED) for m in messages if m.endswith(UNRESOLVED)]
        others = [m for m in messages if not m.endswith(UNRESOLVED)]
        said = [f"{name}{UNRESOLVED}" for name in missing] if len(missing) <= 2 else []
        said += [f"{name_summary(missing)} match no base tensor"] if len(missing) > 2 else []
        said += [list_problems(others, 3)] if others else []
        if recorded.get(label):
            said.append(f"it was made for base model {recorded[label]!r}")
        parts.append(f"{label}: " * bool(label) + "; ".join(said))
    return " | ".join(parts)


def check_argument_order(
    command: str, first: str, first_kind: FileKind, others: Sequence[tuple[str, FileKind]]
) -> None:
    """Refuse a base (or merged model) argument that is an adapter, saying which order was meant.

    Args:
        command: ``merge``, ``unmerge`` or ``swap``.
        first: the argument given as the base (the merged model for unmerge/swap).
        first_kind: what that file is.
        others: the adapter arguments and what they are.

    Raises:
        UnknownFormat: the first argument is an adapter; when an adapter argument is a checkpoint
            the message gives the command with the two swapped.
    """
    if first_kind.kind != "adapter":
        return
    checkpoints = [arg for arg, kind in others if kind.kind == "checkpoint"]
    what = "BASE" if command == "merge" else "MERGED"
    if not checkpoints:
        raise UnknownFormat(
            f"{first}: {first_kind.label}, but the first argument of {command} is the {what} model (a checkpoint)"
        )
    adapters = [arg for arg, kind in others if kind.kind != "checkpoint"] + [first]
    if command == "swap":
        hint = f"loratools swap {checkpoints[0]} --remove ADAPTER --add ADAPTER"
    else:
        hint = f"loratools {command} {checkpoints[0]} {' '.join(adapters)}"
    raise UnknownFormat(
        f"the first argument is an adapter ({first}: {first_kind.label}) and {checkpoints[0]} a checkpoint; "
        f"did you mean `{hint}`?"
    )


def plan_merge(
    infos: Mapping[str, TensorInfo], terms: Sequence[MergeTerm], base_ids: Sequence[str] = ()
) -> MergePlan:
    """Match every adapter to the base and check it fits, listing every problem at once.

    Args:
        infos: the base's tensor name → spec (shape, dtype), in storage order.
        terms: the adapters and their signed weights.
        base_ids: names of the base (argument, path, config ``_name_or_path``) to compare with
            each adapter's recorded ``base_model``; empty skips the check (a merged model's
            name says nothing about its base).

    Returns:
        the plan: which base tensors change and how.

    Raises:
        MissingKeys: adapter modules that match no (or several) base tensors — with any shape
            problems in the same message.
        ShapeMismatch: adapter updates whose shapes do not fit their base tensors.
    """
    updates: dict[str, TensorUpdate] = {}
    problems: Problems = []
    for term in terms:
        _plan_loras(term, infos, updates, problems)
    warnings = _plan_saved(terms, infos, updates, problems)
    for message in lora_on_grown(updates, infos):
        _misfit(problems, message)
    if problems:
        kind = MissingKeys if any(k is MissingKeys for k, _ in problems) else ShapeMismatch
        raise kind(
            f"{len(problems)} problem(s) fitting the adapter(s) to the base: {_compact(problems, terms)}; "
            "is this the base model the adapter was made for?"
        )
    ordered = {name: updates[name] for name in infos if name in updates}
    return MergePlan(ordered, _base_model_warnings(terms, base_ids) + warnings)
