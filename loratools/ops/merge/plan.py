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

from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch, list_problems
from loratools.formats.names import resolve_modules, resolve_tensor_names
from loratools.io.safetensors_file import TensorSpec
from loratools.ops.merge.growth import grows, lora_on_grown
from loratools.ops.merge.terms import FLOAT_DTYPES, MergeTerm, TensorUpdate

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
    """Resolve names one by one so that every unresolved name is reported, not just the first batch."""
    try:
        return resolve_tensor_names(names, base_names)
    except MissingKeys:
        pass
    resolved = {}
    for name in names:
        try:
            resolved.update(resolve_tensor_names([name], base_names))
        except MissingKeys:
            hits = sum(b.endswith("." + name) or name.endswith("." + b) for b in base_names)
            why = f"matches {hits} base tensors" if hits else "matches no base tensor"
            problems.append((MissingKeys, f"{label}: {name} {why}"))
    return resolved


def _fits(weight_shape: tuple[int, ...] | None, shape: tuple[int, ...], expected: tuple[int, int]) -> bool:
    """An (out, in) update fits its tensor; a conv's (out, in·kh·kw) update fits an (out, in, kh, kw)
    kernel (LoCon, conv LoHa/LoKr), unless the adapter states another kernel shape."""
    if len(shape) <= 2:
        return shape == expected
    return (shape[0], math.prod(shape[1:])) == expected and weight_shape in (None, shape)


def _plan_loras(
    term: MergeTerm, infos: Mapping[str, TensorSpec], updates: dict[str, TensorUpdate], problems: Problems
) -> None:
    adapter, label = term.adapter, term.label
    base_names = list(infos)
    try:
        targets = resolve_modules(adapter.modules, base_names)
    except MissingKeys:
        names = _resolve([f"{m}.weight" for m in adapter.modules], base_names, label, problems)
        targets = {m: names[f"{m}.weight"] for m in adapter.modules if f"{m}.weight" in names}
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


def _plan_saved(
    terms: Sequence[MergeTerm],
    infos: Mapping[str, TensorSpec],
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


def plan_merge(
    infos: Mapping[str, TensorSpec], terms: Sequence[MergeTerm], base_ids: Sequence[str] = ()
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
        messages = [message for _, message in problems]
        raise kind(
            f"{len(messages)} problem(s) fitting the adapter(s) to the base: {list_problems(messages, 20)}; "
            "is this the base model the adapter was made for?"
        )
    ordered = {name: updates[name] for name in infos if name in updates}
    return MergePlan(ordered, _base_model_warnings(terms, base_ids) + warnings)
