"""The streaming passes over both checkpoints, and how processes of a torchrun job share them.

Tensors are read pairwise in the fine-tune's storage order (the next pair is prefetched while
this one is factored), except that the 2-D expert weights of one projection of a layer are read
one after another and factored as one batch (:mod:`.batch`). With ``--budget`` a first pass collects every ΔW's top singular values
and the ranks are allocated model-wide before the second pass factors. Under torchrun each
process takes a round-robin share of the items (:mod:`loratools.distributed`) and every
process's :class:`Outcome` is gathered and merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from loratools.adapter import LoraWeight
from loratools.distributed import Workers
from loratools.errors import LoratoolsError
from loratools.kinds.fused import FusedParam, fused_name
from loratools.ops.delta import DeltaBuffer
from loratools.ops.extract.batch import ExpertBatch, StackBuffer, read_units
from loratools.ops.extract.factor import (
    ModuleReport,
    factor_fused,
    factor_module,
    truncated_spectra,
    truncated_spectrum,
)
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import Item, TensorSource
from loratools.ops.moe import is_router
from loratools.ops.spectrum.noise import noise_floor
from loratools.progress import Progress


@dataclass
class Outcome:
    """What one process found: factored modules, carried tensors and notes, by item name."""

    weights: dict[str, tuple[LoraWeight, ModuleReport]] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name → why it is not in the adapter
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # budget: ΔW's top σ, pass 1


def _pairs(
    base: TensorSource, finetuned: TensorSource, names: list[str]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Both checkpoints' tensors, in step, each read ahead by its own prefetch thread."""
    for (name, w_ft), (_, w_base) in zip(
        finetuned.iter_tensors(names), base.iter_tensors(names), strict=True
    ):
        yield name, w_ft, w_base


def _by_unit(
    base: TensorSource, finetuned: TensorSource, items: list[Item]
) -> Iterator[tuple[Item, torch.Tensor, torch.Tensor, list[Item]]]:
    """(item, W_ft, W_base, its unit) in read order (:func:`~.batch.read_units`: a layer's experts
    of one projection one after another, so they can be factored as one batch)."""
    units = _overlapped(read_units(items))
    unit_of = {item.name: unit for unit in units for item in unit}
    by_name = {item.name: item for item in items}
    for name, w_ft, w_base in _pairs(base, finetuned, [item.name for unit in units for item in unit]):
        yield by_name[name], w_ft, w_base, unit_of[name]


def _overlapped(units: list[list[Item]]) -> list[list[Item]]:
    """``units`` with those that are only compared or carried (the embedding and lm_head: hundreds
    of MB) moved off the ends — the leading ones after the first unit to factor, the trailing ones
    before the last — where their reading overlaps factoring instead of stalling it (the reads
    run one tensor ahead; 0.2 s of a 0.66 B extract's 0.3 s of waiting was at the two ends)."""
    factored = [i for i, unit in enumerate(units) if unit[0].kind == "lora"]
    if len(factored) < 2:
        return units
    first, last = factored[0], factored[-1]
    return (
        units[first : first + 1]
        + units[:first]
        + units[first + 1 : last]
        + units[last + 1 :]
        + units[last : last + 1]
    )


def spectra_pass(
    base: TensorSource,
    finetuned: TensorSource,
    items: list[Item],
    options: ExtractOptions,
    buffer: DeltaBuffer,
) -> Outcome:
    """Budget pass 1: the top ``width`` singular values of every ΔW (factors are not kept); the
    experts of a fused tensor, or of one projection of a layer, from one batched SVD."""
    outcome = Outcome()
    stacks = StackBuffer(buffer.device)
    batch: ExpertBatch | None = None
    for item, w_ft, w_base, unit in _by_unit(base, finetuned, items):
        delta, total = buffer.delta(item.name, w_ft, w_base)
        if len(unit) > 1:
            if item is unit[0]:
                batch = ExpertBatch(stacks.stack(len(unit), item.shape))
            assert batch is not None  # the unit's first item came first
            if total > 0:
                batch.add(item, delta, total, None)
            if item is unit[-1]:
                outcome.spectra.update(batch.spectra(options.width, options))
        elif total > 0 and delta.ndim == 3:  # fused experts (E, p, q): one spectrum per changed expert
            changed = [e for e in range(delta.shape[0]) if bool(delta[e].any())]
            svds = truncated_spectra(delta[changed], options.width, options)
            outcome.spectra.update(
                {fused_name(item.name, e): svd.s.cpu() for e, svd in zip(changed, svds, strict=True)}
            )
        elif total > 0:
            outcome.spectra[item.name] = truncated_spectrum(delta, options.width, options, buffer).s.cpu()
    return outcome


def _carry(
    item: Item, w_ft: torch.Tensor, w_base: torch.Tensor, options: ExtractOptions, lora_modules: set[str]
) -> str | None:
    """Why a non-LoRA tensor is left out (``"unchanged"``, or what would carry it); None: carry it."""
    if not item.resized and torch.equal(w_ft, w_base):
        return "unchanged"
    if item.name.rsplit(".", 1)[0] in lora_modules:
        return "differs, but its module gets LoRA factors; PEFT cannot also save it in full (not carried)"
    if is_router(item.name):
        return None  # routers are carried whole (E × hidden: small), see ops/moe.py
    if item.kind == "embedding":
        if options.embedding_mode == "full" or item.resized:  # resized: only with full/lora (plan)
            return None
        return "embedding/lm_head differs: pass --embeddings lora, or full (--include-embeddings)"
    return None if options.modules_to_save else "differs (not LoRA-able): pass --modules-to-save to carry it"


def with_noise_floor(
    factored: tuple[LoraWeight, ModuleReport],
    base: TensorSource,
    finetuned: TensorSource,
    name: str,
    w_ft: torch.Tensor,
) -> tuple[LoraWeight, ModuleReport]:
    """A quantized base: the module's report with the base's rounding noise (Q(W_ft) − W_ft) beside it."""
    weight, report = factored
    floor = noise_floor(base, finetuned, name, w_ft, None, report.delta_norm**2)
    return (weight, replace(report, noise_floor=floor)) if floor is not None else factored


def factor_pass(
    base: TensorSource,
    finetuned: TensorSource,
    items: list[Item],
    options: ExtractOptions,
    buffer: DeltaBuffer,
    dtype: torch.dtype,
    ranks: dict[str, int] | None,
    lora_modules: set[str],
    progress: Progress,
    fused: Mapping[str, tuple[FusedParam, int]] | None = None,
) -> Outcome:
    """Factor every LoRA item (``ranks`` fixes them, for a budget) and compare the others.

    ``fused``: the fused expert tensors' layouts and PEFT nesting depths (factored per expert).
    """
    outcome = Outcome()
    stacks = StackBuffer(buffer.device)
    batch: ExpertBatch | None = None
    for item, w_ft, w_base, unit in _by_unit(base, finetuned, items):
        name = item.name
        if len(unit) > 1:  # one expert of a layer's projection: factored with the others at the last one
            if item is unit[0]:
                batch = ExpertBatch(stacks.stack(len(unit), item.shape))
            assert batch is not None  # the unit's first item came first
            _add_to_batch(outcome, batch, item, w_ft, w_base, ranks, buffer, base, finetuned)
            if item is unit[-1]:
                _factor_batch(outcome, batch, ranks, options, dtype)
        elif fused and name in fused:
            _factor_fused(outcome, item, buffer.delta(name, w_ft, w_base), ranks, options, dtype, fused[name])
        elif item.kind == "lora" and (ranks is None or ranks.get(name, 0) > 0):
            delta, total = buffer.delta(name, w_ft, w_base)
            rank = None if ranks is None else ranks[name]
            factored = factor_module(item, delta, total, rank, options, dtype, buffer) if total > 0 else None
            if total == 0:
                outcome.skipped[name] = "unchanged"
            elif factored is None:
                outcome.skipped[name] = "no singular value above --sv-threshold"
            else:
                outcome.weights[name] = with_noise_floor(factored, base, finetuned, name, w_ft)
        elif item.kind == "lora":
            outcome.skipped[name] = "unchanged" if torch.equal(w_ft, w_base) else "no rank left in --budget"
        else:
            reason = _carry(item, w_ft, w_base, options, lora_modules)
            if reason is None:
                outcome.saved[name] = w_ft.to(dtype) if w_ft.is_floating_point() else w_ft
            else:
                outcome.skipped[name] = reason
        progress(name)
    return outcome


def _add_to_batch(
    outcome: Outcome,
    batch: ExpertBatch,
    item: Item,
    w_ft: torch.Tensor,
    w_base: torch.Tensor,
    ranks: dict[str, int] | None,
    buffer: DeltaBuffer,
    base: TensorSource,
    finetuned: TensorSource,
) -> None:
    """A changed expert weight joins the batch (its ΔW copied in); others get their reason now."""
    if ranks is not None and ranks.get(item.name, 0) == 0:
        outcome.skipped[item.name] = "unchanged" if torch.equal(w_ft, w_base) else "no rank left in --budget"
        return
    delta, total = buffer.delta(item.name, w_ft, w_base)
    if total == 0:
        outcome.skipped[item.name] = "unchanged"
        return
    batch.add(item, delta, total, noise_floor(base, finetuned, item.name, w_ft, None, total))


def _factor_batch(
    outcome: Outcome,
    batch: ExpertBatch,
    ranks: dict[str, int] | None,
    options: ExtractOptions,
    dtype: torch.dtype,
) -> None:
    for name, factored in batch.factor(ranks, options, dtype).items():
        if factored is None:
            outcome.skipped[name] = "no singular value above --sv-threshold"
        else:
            outcome.weights[name] = factored


def _factor_fused(
    outcome: Outcome,
    item: Item,
    delta_total: tuple[torch.Tensor, float],
    ranks: dict[str, int] | None,
    options: ExtractOptions,
    dtype: torch.dtype,
    layout: tuple[FusedParam, int],
) -> None:
    """A fused expert tensor: its experts' LoRAs go in as ``name[e]``, or the reason it has none."""
    delta, total = delta_total
    param, depth = layout
    experts = [fused_name(item.name, e) for e in range(param.num_experts)]
    fixed = None if ranks is None else [ranks.get(n, 0) for n in experts]
    factored = factor_fused(item, delta, fixed, options, dtype, param, depth) if total > 0 else []
    if total == 0:
        outcome.skipped[item.name] = "unchanged"
    elif not factored:
        outcome.skipped[item.name] = (
            "no rank left in --budget" if ranks is not None else "no singular value above --sv-threshold"
        )
    for weight, report in factored:
        outcome.weights[report.name] = (weight, report)


def _merge(outcomes: list[Outcome]) -> Outcome:
    merged = Outcome()
    for outcome in outcomes:
        merged.weights.update(outcome.weights)
        merged.saved.update(outcome.saved)
        merged.skipped.update(outcome.skipped)
        merged.spectra.update(outcome.spectra)
    return merged


def run_everywhere(workers: Workers, work: Callable[[], Outcome]) -> Outcome:
    """Run ``work`` on this process's share and combine every process's outcome.

    An error on any process is raised on all of them (instead of leaving the others waiting).
    """
    try:
        mine: Outcome | str = work()
    except LoratoolsError as exc:
        mine = str(exc)
    gathered = workers.all_gather(mine)
    errors = [item for item in gathered if isinstance(item, str)]
    if errors:
        raise LoratoolsError(errors[0])
    return _merge(gathered)
