"""Merge adapters into base weights, take them out again, or swap one for another — streaming.

The paper's deployment story (Hu et al., 2021, §4.1, https://arxiv.org/abs/2106.09685): keep
one (A, B) per task, bake ``s·B·A`` into the frozen weight for zero-latency inference, and
switch tasks by subtracting one product and adding another. For every adapted base tensor::

    W = W0 + Σᵢ wᵢ · sᵢ · Bᵢ @ Aᵢ         W0: (out, in), Bᵢ: (out, rᵢ), Aᵢ: (rᵢ, in)

with wᵢ > 0 for adapters added (merge) and wᵢ < 0 for adapters removed (unmerge); a swap is
one pass with both. The sum runs in float32 as one matmul of the stacked factors
``[w₁s₁B₁ | w₂s₂B₂ | …] @ [A₁; A₂; …]`` added in place into a float32 copy of W0, then cast
once to the output dtype. ``modules_to_save`` tensors replace the base tensor whole.

The base is streamed tensor by tensor in storage order (the next tensor is read while this one
is computed); tensors no adapter touches are copied as their stored bytes, so untouched files
are byte-identical. Peak memory is about two float32 copies of the largest adapted tensor plus
the adapters.

Precision report, per adapted tensor (Δ = Σ wᵢsᵢBᵢAᵢ, computed from the factors)::

    relative_delta = ‖Δ‖_F / ‖W0‖_F
    lost_fraction  = ‖round(W0 + Δ) − round(W0) − Δ‖_F / ‖Δ‖_F

the share of the update destroyed by rounding to the output dtype. An update far below the
dtype's resolution (bf16 keeps 8 bits: ‖Δ‖/‖W0‖ ≈ 4e-5 ≪ 2⁻⁹) vanishes almost entirely.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Queue
from threading import Thread
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch, list_problems
from loratools.formats.names import resolve_modules, resolve_tensor_names
from loratools.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, ShardLayout
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import CheckpointWriter, atomic_output, check_not_an_input, copy_model_files
from loratools.ops import Progress, no_progress

__all__ = [
    "MergeOptions",
    "MergeReport",
    "MergeTerm",
    "ModuleStats",
    "TensorUpdate",
    "apply_update",
    "delta_norm",
    "merge_checkpoint",
    "merge_paths",
    "plan_merge",
    "stacked_factors",
]

Problems = list[tuple[type[LoratoolsError], str]]  # (error class, one-line description)
SAMPLE_ELEMENTS = 1 << 20  # precision stats look at about this many elements per tensor
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# -- what to do ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeTerm:
    """One adapter and the signed weight it enters with: ``+w`` adds ``w·s·B·A``, ``−w`` removes it.

    Attributes:
        adapter: the adapter.
        weight: the signed multiplier wᵢ.
        label: how messages name it (the path the user gave).
    """

    adapter: Adapter
    weight: float = 1.0
    label: str = "adapter"


@dataclass(frozen=True)
class MergeOptions:
    """Options of merge / unmerge / swap.

    Attributes:
        dtype: output dtype of floating tensors; None keeps each tensor's own.
        device: where the matmuls run (``cpu``, ``cuda``, ``cuda:N``).
        lost_warning: warn when more than this fraction of the update is lost to rounding.
        threads: torch's intra-op threads for the CPU math; 0 means the cores less the two that
            the reader and writer threads keep busy (at least 1). Oversubscribed OpenMP regions
            slow every op several-fold (a 16×16 Gram matrix took 80 ms instead of 0.05 ms).
    """

    dtype: torch.dtype | None = None
    device: str = "cpu"
    lost_warning: float = 0.5
    threads: int = 0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise LoratoolsError(
                f"--dtype {self.dtype}: not a floating dtype; use float32, bfloat16 or float16"
            )
        if not 0.0 < self.lost_warning <= 1.0:
            raise LoratoolsError(f"lost_warning={self.lost_warning}: must be in (0, 1]")
        if self.threads < 0:
            raise LoratoolsError(f"threads={self.threads}: must be 0 (automatic) or more")

    def intra_op_threads(self, cores: int) -> int:
        """The thread count for the math on a machine with ``cores`` cores."""
        return self.threads or max(1, cores - 2)


@dataclass
class TensorUpdate:
    """Everything that happens to one base tensor.

    Attributes:
        loras: (factors, signed weight, transposed) per adapter touching it; ``transposed`` for
            fan_in_fan_out bases, which store the weight as (in, out).
        replacement: a ``modules_to_save`` tensor that replaces the base tensor whole.
    """

    loras: list[tuple[LoraWeight, float, bool]] = field(default_factory=list)
    replacement: torch.Tensor | None = None


def stacked_factors(
    update: TensorUpdate, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(L, R)`` with ``L @ R = Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ`` (transposed for fan_in_fan_out).

    Returns:
        L: (out, Σrᵢ) = [w₁s₁B₁ | …], R: (Σrᵢ, in) = [A₁; …] — or (in, Σrᵢ), (Σrᵢ, out) when
        transposed, since (sBA)ᵀ = Aᵀ (sB)ᵀ.
    """
    lefts, rights = [], []
    for lora, weight, transposed in update.loras:
        b, a = lora.scaled_factors()  # (out, r) · s, (r, in)
        b = (b * weight).to(device)
        a = a.to(device)
        lefts.append(a.T if transposed else b)
        rights.append(b.T if transposed else a)
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)


def delta_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L @ R‖_F without forming it: ‖LR‖² = tr(LᵀL · RRᵀ) = Σ (LᵀL) ⊙ (RRᵀ), both R×R."""
    gram = (left.T @ left) * (right @ right.T)  # (R, R)
    return math.sqrt(max(float(gram.sum()), 0.0))


# -- the math on one tensor ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleStats:
    """The precision record of one adapted tensor (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    adapters: int
    base_norm: float
    delta_norm: float
    lost_norm: float

    @property
    def relative_delta(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.inf

    @property
    def lost_fraction(self) -> float:
        return self.lost_norm / self.delta_norm if self.delta_norm > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "adapters": self.adapters,
            "relative_delta": self.relative_delta,
            "lost_fraction": self.lost_fraction,
        }


class Scratch:
    """A reusable float32 buffer, grown to the largest tensor seen (no allocation per tensor)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._flat = torch.empty(0, device=self.device)

    def get(self, shape: torch.Size) -> torch.Tensor:
        numel = shape.numel()
        if self._flat.numel() < numel:
            self._flat = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._flat[:numel].view(shape)


def sampled_rows(shape: torch.Size, budget: int = SAMPLE_ELEMENTS) -> tuple[slice, float]:
    """Every m-th row, so that about ``budget`` elements are looked at, and the factor d/|rows|
    that turns a squared norm over those rows into an estimate over all of them."""
    rows = shape[0] if len(shape) else 1
    step = max(1, math.ceil(shape.numel() / budget)) if rows else 1
    taken = len(range(0, rows, step))
    return slice(None, None, step), rows / taken if taken else 1.0


def apply_update(
    name: str,
    w0: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out_dtype: torch.dtype,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, ModuleStats]:
    """``round(W0 + L @ R)`` in ``out_dtype``, with its precision record.

    The sum is one ``addmm`` into a float32 copy of W0 and one cast. The record's norms
    ‖W0‖ and ‖round(W0+Δ) − round(W0) − Δ‖ are exact up to 2²⁰ elements; beyond that they are
    measured on every m-th row (about 2²⁰ elements) and scaled by d/rows — rounding errors are
    alike across rows, so the estimate is good to about 0.1%, at a tenth of the cost of a full
    pass. ‖Δ‖ is always exact (from the factors).

    Args:
        name: the tensor's name, for the record.
        w0: base tensor (d, k), any float dtype, on any device.
        left, right: float32 factors (d, R) and (R, k) from :func:`stacked_factors`.
        out_dtype: dtype of the result.
        scratch: a reusable buffer (on the factors' device) for narrower outputs.

    Returns:
        the merged tensor (d, k) in ``out_dtype`` on the factors' device, and its stats.
    """
    if out_dtype == torch.float32 or scratch is None:
        total = torch.empty(w0.shape, dtype=torch.float32, device=left.device)  # it is the output
    else:
        total = scratch.get(w0.shape)
    total.copy_(w0).addmm_(left, right)  # (d, k): W0 + Δ, rounded once to float32
    out = total if out_dtype == torch.float32 else total.to(out_dtype)
    rows, factor = sampled_rows(w0.shape)
    # round(W0+Δ) − round(W0) − Δ on the sampled rows; (W0+Δ)₃₂ stands for W0 + Δ when W0 is
    # already in the narrower output dtype (its own rounding, ≤ 2⁻²⁴·|W0+Δ|, is negligible there)
    lost = out[rows].to(torch.float32, copy=True)
    if out_dtype == w0.dtype and out_dtype != torch.float32:
        lost.sub_(total[rows])
    else:
        lost.sub_(w0[rows].to(out_dtype).float()).addmm_(left[rows], right, alpha=-1.0)
    stats = ModuleStats(
        name,
        tuple(w0.shape),
        str(out_dtype).removeprefix("torch."),
        adapters=0,
        base_norm=float(torch.linalg.vector_norm(w0[rows].float())) * math.sqrt(factor),
        delta_norm=delta_norm(left, right),
        lost_norm=float(torch.linalg.vector_norm(lost)) * math.sqrt(factor),
    )
    return out, stats


# -- planning: every problem found before anything is written ------------------------------------
@dataclass
class MergePlan:
    """Base tensor name → its update, plus warnings found while planning."""

    updates: dict[str, TensorUpdate]
    warnings: list[str]


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
        expected = (lora.in_features, lora.out_features) if adapter.fan_in_fan_out else lora.shape
        if target in seen:
            _misfit(problems, f"{label}: {module} and {seen[target]} both adapt {target}")
        elif tuple(info.shape) != expected:
            _misfit(
                problems,
                f"{label}: {module} makes a {list(expected)} update but {target} is {list(info.shape)}",
            )
        elif info.dtype not in FLOAT_DTYPES:
            _misfit(problems, f"{label}: {target} is {info.dtype}, not a float tensor")
        else:
            updates.setdefault(target, TensorUpdate()).loras.append(
                (lora, term.weight, adapter.fan_in_fan_out)
            )
        seen[target] = module


def _plan_saved(
    terms: Sequence[MergeTerm],
    infos: Mapping[str, TensorSpec],
    updates: dict[str, TensorUpdate],
    problems: Problems,
) -> list[str]:
    """Whole-tensor replacements (modules_to_save); returns warnings."""
    warnings, removed, replaced_by = [], {}, {}
    for term in terms:
        saved = term.adapter.saved_modules
        names = _resolve(list(saved), list(infos), term.label, problems)
        if names and term.weight > 0 and term.weight != 1.0:
            warnings.append(
                f"{term.label}: modules_to_save replace tensors whole; --weight does not scale them"
            )
        for name, target in names.items():
            tensor, info = saved[name], infos[target]
            if tuple(tensor.shape) != tuple(info.shape):
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
    if problems:
        kind = MissingKeys if any(k is MissingKeys for k, _ in problems) else ShapeMismatch
        messages = [message for _, message in problems]
        raise kind(
            f"{len(messages)} problem(s) fitting the adapter(s) to the base: {list_problems(messages, 20)}; "
            "is this the base model the adapter was made for?"
        )
    ordered = {name: updates[name] for name in infos if name in updates}
    return MergePlan(ordered, _base_model_warnings(terms, base_ids) + warnings)


# -- streaming over a checkpoint -----------------------------------------------------------------
@dataclass(frozen=True)
class MergeReport:
    """What a merge/unmerge/swap did, with its precision record (``to_dict`` is the --json shape)."""

    output: str
    operation: str
    adapters: list[dict[str, Any]]
    dtype: str | None
    modules: list[ModuleStats]
    replaced: list[str]
    copied: int
    files: list[str]
    warnings: list[str]
    lost_warning: float = 0.5

    @property
    def relative_delta(self) -> float:
        base = math.sqrt(sum(m.base_norm**2 for m in self.modules))
        return math.sqrt(sum(m.delta_norm**2 for m in self.modules)) / base if base > 0 else math.nan

    @property
    def lost_fraction(self) -> float:
        """The share of the whole update lost to rounding: √Σ‖lostᵢ‖² / √Σ‖Δᵢ‖²."""
        delta = math.sqrt(sum(m.delta_norm**2 for m in self.modules))
        return math.sqrt(sum(m.lost_norm**2 for m in self.modules)) / delta if delta > 0 else math.nan

    @property
    def effect_vanishes(self) -> bool:
        return self.lost_fraction > self.lost_warning

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "operation": self.operation,
            "adapters": self.adapters,
            "dtype": self.dtype,
            "merged": len(self.modules),
            "replaced": self.replaced,
            "copied": self.copied,
            "files": self.files,
            "precision": {
                "relative_delta": self.relative_delta,
                "lost_fraction": self.lost_fraction,
                "effect_vanishes": self.effect_vanishes,
                "modules_mostly_lost": sum(m.lost_fraction > self.lost_warning for m in self.modules),
            },
            "modules": [m.to_dict() for m in self.modules],
            "warnings": self.warnings,
        }


def _read_ahead(ckpt: Checkpoint, plan: list[tuple[str, bool]]) -> Iterator[tuple[str, torch.Tensor | bytes]]:
    """Yield (name, tensor or stored bytes) in order, reading the next one in a thread meanwhile."""

    def read(item: tuple[str, bool]) -> torch.Tensor | bytes:
        name, raw = item
        return ckpt.get_raw(name) if raw else ckpt.get(name)

    if not plan:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-read") as pool:
        pending = pool.submit(read, plan[0])
        for position, (name, _) in enumerate(plan):
            data = pending.result()
            if position + 1 < len(plan):
                pending = pool.submit(read, plan[position + 1])
            yield name, data


def merged_tensors(
    ckpt: Checkpoint, plan: MergePlan, options: MergeOptions, stats: list[ModuleStats], progress: Progress
) -> Iterator[tuple[str, torch.Tensor | bytes]]:
    """The output tensors in storage order: updated, replaced, cast, or the stored bytes as they are."""
    device = torch.device(options.device)
    scratch = Scratch(device)
    order = []
    for info in ckpt.infos():
        keep = info.name not in plan.updates and (options.dtype is None or info.dtype not in FLOAT_DTYPES)
        order.append((info.name, keep))
    for name, data in _read_ahead(ckpt, order):
        update = plan.updates.get(name)
        if isinstance(data, bytes):
            yield name, data
        elif update is None:
            yield name, data.to(options.dtype or data.dtype)
        else:
            w0 = update.replacement if update.replacement is not None else data
            out_dtype = options.dtype or data.dtype
            if update.loras:
                left, right = stacked_factors(update, device)
                out, record = apply_update(name, w0.to(device), left, right, out_dtype, scratch)
                stats.append(replace(record, adapters=len(update.loras)))
                yield name, out.cpu()
            else:
                yield name, w0.to(out_dtype)
        progress(name)


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _output_layout(ckpt: Checkpoint, options: MergeOptions) -> list[ShardLayout]:
    dtype_of = {}
    if options.dtype is not None:
        dtype_of = {i.name: options.dtype for i in ckpt.infos() if i.dtype in FLOAT_DTYPES}
    layout = ckpt.layout(dtype_of)
    if ckpt.kind == "pytorch" and len(layout) == 1 and ckpt.model_dir is not None:
        layout = [replace(layout[0], filename="model.safetensors")]  # what transformers looks for
    return layout


def _write(ckpt: Checkpoint, folder: Path, layout: list[ShardLayout], tensors: Iterator[Any]) -> None:
    index_name = SAFETENSORS_INDEX if ckpt.index_name else None
    with CheckpointWriter(folder, layout, ckpt.metadata or {"format": "pt"}, index_name) as writer:
        _write_behind(tensors, writer.write)


def _write_behind(items: Iterator[tuple[str, Any]], write: Callable[[str, Any], None]) -> None:
    """Call ``write`` on each item in a second thread, so computing the next tensor overlaps
    writing this one (reads already run ahead in another). At most one item waits in between."""
    pending: Queue[tuple[str, Any] | None] = Queue(maxsize=1)
    failures: list[BaseException] = []

    def consume() -> None:
        while (item := pending.get()) is not None:
            if not failures:
                try:
                    write(*item)
                except BaseException as exc:  # handed to the producer below
                    failures.append(exc)

    thread = Thread(target=consume, name="loratools-write", daemon=True)
    thread.start()
    try:
        for item in items:
            if failures:
                break
            pending.put(item)
    finally:
        pending.put(None)
        thread.join()
    if failures:
        raise failures[0]


def _finish_model_dir(ckpt: Checkpoint, folder: Path, options: MergeOptions) -> list[str]:
    """Copy config/tokenizer files; keep the source index verbatim when no dtype changed."""
    assert ckpt.model_dir is not None
    copied = copy_model_files(ckpt.model_dir, folder)
    if options.dtype is None and ckpt.kind == "safetensors-sharded" and ckpt.index_name:
        shutil.copyfile(ckpt.model_dir / ckpt.index_name, folder / SAFETENSORS_INDEX)
    config = folder / "config.json"
    if options.dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "torch_dtype" in data:
            data["torch_dtype"] = str(options.dtype).removeprefix("torch.")
            config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def merge_checkpoint(
    ckpt: Checkpoint,
    terms: Sequence[MergeTerm],
    output: str | Path,
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    base_ids: Sequence[str] | None = None,
    operation: str | None = None,
    progress: Progress = no_progress,
) -> MergeReport:
    """Write ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` for every tensor of ``ckpt`` to ``output``, streaming.

    ``output`` is a model folder when the base is one (same shard files, index and metadata,
    config/tokenizer files copied), else a single ``.safetensors`` file. It is written
    atomically after every adapter has been checked against the base.

    Args:
        ckpt: the base (or merged) checkpoint.
        terms: adapters with signed weights (negative = remove).
        output: the folder or file to create.
        options: dtype, device, warning threshold.
        force: replace an existing output.
        inputs: adapter paths, which the output must not overlap.
        base_ids: names of the base for the base_model check (see :func:`plan_merge`); default:
            its path when merging, nothing (no check) when removing adapters.
        operation: ``merge``/``unmerge``/``swap`` for the report; default from the weights' signs.
        progress: called once per tensor.

    Returns:
        the report, including the precision record and warnings.

    Raises:
        MissingKeys, ShapeMismatch: adapters that do not fit, all listed, before writing anything.
        OutputExists: ``output`` exists and not ``force``.
    """
    options = options or MergeOptions()
    output = Path(output)
    check_not_an_input(output, [ckpt.path, ckpt.model_dir, *inputs])
    infos = {info.name: info for info in ckpt.infos()}
    if operation is None:
        signs = {term.weight > 0 for term in terms}
        operation = "swap" if len(signs) == 2 else "merge" if signs == {True} else "unmerge"
    if base_ids is None:
        base_ids = [str(ckpt.path)] if operation == "merge" else []
    plan = plan_merge(infos, terms, base_ids)
    layout = _output_layout(ckpt, options)
    stats: list[ModuleStats] = []
    files: list[str] = []
    threads = options.intra_op_threads(os.cpu_count() or 1)
    with atomic_output(output, force=force) as temporary, _intra_op_threads(threads):
        tensors = merged_tensors(ckpt, plan, options, stats, progress)
        if ckpt.model_dir is None:  # a single file in, a single file out
            _write(ckpt, temporary.parent, [replace(layout[0], filename=temporary.name)], tensors)
        else:
            _write(ckpt, temporary, layout, tensors)
            files = _finish_model_dir(ckpt, temporary, options)
    return _report(output, operation, terms, options, plan, stats, files, len(infos))


def _report(
    output: Path,
    operation: str,
    terms: Sequence[MergeTerm],
    options: MergeOptions,
    plan: MergePlan,
    stats: list[ModuleStats],
    files: list[str],
    total: int,
) -> MergeReport:
    adapters = [
        {
            "path": t.label,
            "weight": t.weight,
            "modules": len(t.adapter.weights),
            "saved_modules": len(t.adapter.saved_modules),
            "base_model": t.adapter.base_model,
        }
        for t in terms
    ]
    replaced = [name for name, u in plan.updates.items() if u.replacement is not None]
    dtype = str(options.dtype).removeprefix("torch.") if options.dtype else None
    report = MergeReport(
        str(output), operation, adapters, dtype, stats, replaced, total - len(plan.updates), files,
        list(plan.warnings), options.lost_warning,
    )  # fmt: skip
    return replace(report, warnings=report.warnings + _precision_warnings(report))


def _precision_warnings(report: MergeReport) -> list[str]:
    dtypes = sorted({m.dtype for m in report.modules})
    hint = "" if dtypes == ["float32"] else "; keep it with --dtype float32"
    if report.effect_vanishes:
        return [
            f"{report.lost_fraction:.0%} of the adapters' update is lost rounding to {'/'.join(dtypes)}: "
            f"‖Δ‖/‖W0‖ ≈ {report.relative_delta:.1e} is below the dtype's resolution{hint}"
        ]
    lost = [m.name for m in report.modules if m.lost_fraction > report.lost_warning]
    if lost:
        return [
            f"{len(lost)} of {len(report.modules)} module(s) lose most of their update to rounding "
            f"(e.g. {lost[0]}){hint}"
        ]
    return []


def _base_ids(argument: str, ckpt: Checkpoint) -> list[str]:
    ids = [argument, str(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)]
    config = ckpt.model_dir / "config.json" if ckpt.model_dir else None
    if config is not None and config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (ValueError, AttributeError):
            name = None
        ids += [name] if isinstance(name, str) else []
    return ids


def merge_paths(
    base: str,
    output: str | Path,
    *,
    add: Sequence[tuple[str, float]] = (),
    remove: Sequence[tuple[str, float]] = (),
    options: MergeOptions | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> MergeReport:
    """Open the base and the adapters named by path or Hub id, then :func:`merge_checkpoint`.

    Args:
        base: checkpoint path or Hub id (the merged model, for unmerge/swap).
        output: folder (or ``.safetensors`` file for a single-file base) to write.
        add: (adapter, weight) pairs to add: ``W += w·s·B·A``.
        remove: (adapter, weight) pairs to subtract: ``W −= w·s·B·A``.
        options: dtype, device, warning threshold.
        force: replace an existing output.
        progress: called once per base tensor.

    Returns:
        the report.
    """
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path

    if not add and not remove:
        raise LoratoolsError("no adapter given; name at least one adapter to merge or remove")
    ckpt = open_checkpoint(resolve_path(base))
    names = ckpt.names()
    terms, paths = [], []
    for sign, pairs in ((1.0, add), (-1.0, remove)):
        for argument, weight in pairs:
            path = resolve_path(argument, what="adapter")
            terms.append(MergeTerm(load_adapter(path, base_names=names), sign * weight, str(argument)))
            paths.append(path)
    operation = "swap" if add and remove else "merge" if add else "unmerge"
    return merge_checkpoint(
        ckpt,
        terms,
        output,
        options,
        force=force,
        inputs=paths,
        base_ids=_base_ids(base, ckpt) if operation == "merge" else [],
        operation=operation,
        progress=progress,
    )
