"""The public entry point :func:`combine_adapters`: check the adapters against each other, then
combine them module by module (:mod:`loratools.ops.combine.module`) into one new adapter."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch

from loratools.adapter import Adapter, LoraWeight, ModuleWeight
from loratools.errors import InvalidOptions, ShapeMismatch, list_problems
from loratools.ops.combine.module import combine_module, folded
from loratools.ops.combine.options import CombineOptions, CombineResult, ModuleCombine
from loratools.ops.combine.saved import combine_saved
from loratools.ops.dora import DORA_HOW, refuse_dora
from loratools.progress import Progress, no_progress


def _gather(adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, ModuleWeight]]]:
    groups: dict[str, list[tuple[int, ModuleWeight]]] = {}
    for i, adapter in enumerate(adapters):
        for name, weight in adapter.weights.items():
            groups.setdefault(name, []).append((i, weight))
    return groups


def _check_compatible(
    adapters: Sequence[Adapter], groups: dict[str, list[tuple[int, ModuleWeight]]], labels: list[str]
) -> None:
    """Refuse, listing every conflict at once, modules whose delta shapes differ between adapters."""
    conflicts = []
    for name, items in groups.items():
        if len({w.shape for _, w in items}) > 1:
            shapes = ", ".join(f"{labels[i]} {w.shape[0]}×{w.shape[1]}" for i, w in items)
            conflicts.append(f"{name} ({shapes})")
    if conflicts:
        raise ShapeMismatch(
            f"{len(conflicts)} module(s) have different shapes in different adapters: "
            f"{list_problems(conflicts)}; combine only adapters made for the same base model"
        )
    layouts = {a.fan_in_fan_out for a in adapters}
    if len(layouts) > 1:
        raise ShapeMismatch(
            "some adapters set fan_in_fan_out and some do not; they were made for different base models"
        )


def _output_dtype(adapters: Sequence[Adapter], options: CombineOptions) -> torch.dtype:
    if options.dtype is not None:
        return options.dtype
    dtypes = {w.dtype for a in adapters for w in a.weights.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _base_model(adapters: Sequence[Adapter]) -> str | None:
    names = list(dict.fromkeys(a.base_model for a in adapters if a.base_model))
    if len(names) > 1:
        warnings.warn(
            f"the adapters name different base models ({', '.join(names)}); using {names[0]}", stacklevel=3
        )
    return names[0] if names else None


def combine_adapters(
    adapters: Sequence[Adapter],
    options: CombineOptions,
    *,
    sources: Sequence[str] | None = None,
    progress: Progress = no_progress,
) -> CombineResult:
    """Combine adapters into one: ``ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ`` per module, exactly or at a lower rank.

    Args:
        adapters: the inputs, in order (weights match by position).
        options: method, weights, rank/energy, density, seed, …
        sources: names of the inputs (paths) for messages and provenance.
        progress: called with each module's name once it is done.

    Returns:
        CombineResult with the new adapter (base model, task type and extra config of the first
        input; provenance ``{"method": "combine", "combine_method", "weights", …, "inputs"}``).

    Raises:
        InvalidOptions: no adapters, or a weight count that does not match.
        ShapeMismatch: a module whose shape differs between adapters (all conflicts listed).
        LoratoolsError: modules_to_save that cannot be combined under ``options.saved_modules``.

    Example:
        >>> negated = combine_adapters([adapter], CombineOptions(weights=(-1.0,))).adapter
        >>> merged = combine_adapters([a1, a2], CombineOptions(rank=16)).adapter
    """
    if not adapters:
        raise InvalidOptions("combine needs at least one adapter")
    for i, adapter in enumerate(adapters):  # a DoRA update depends on W0: no sum of s·B·A
        refuse_dora(adapter, "combine", DORA_HOW, sources[i] if sources else f"adapter {i + 1}")
    weights = list(options.weights) if options.weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidOptions(
            f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per adapter"
        )
    labels = list(sources) if sources is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    groups = _gather(adapters)
    _check_compatible(adapters, groups, labels)
    saved, dropped = combine_saved(adapters, weights, options.saved_modules, labels)
    dtype, device = _output_dtype(adapters, options), torch.device(options.device)
    out: dict[str, LoraWeight] = {}
    report = []
    for name, items in groups.items():
        module, kept = combine_module(name, folded(items, weights, device), options, dtype)
        out[name] = replace(
            module,
            embedding=any(getattr(w, "embedding", False) for _, w in items),
            # a conv stays a conv LoRA (an input read without its kernel shape has None there)
            weight_shape=next((w.weight_shape for _, w in items if w.weight_shape is not None), None),
        )
        report.append(ModuleCombine(name, out[name].rank, kept, [i for i, _ in items]))
        progress(name)
    inputs = [
        {"source": label, "provenance": dict(a.provenance)} for label, a in zip(labels, adapters, strict=True)
    ]
    first = adapters[0]
    combined = Adapter(
        weights=out,
        saved_modules=saved,
        base_model=_base_model(adapters),
        task_type=first.task_type,
        fan_in_fan_out=first.fan_in_fan_out,
        extra_config=dict(first.extra_config),
        provenance={"method": "combine", **options.record(weights), "inputs": inputs},
    )
    return CombineResult(combined, report, sorted(saved), sorted(dropped))
