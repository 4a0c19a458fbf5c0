"""Extract a LoRA adapter from a full fine-tune: ΔW = W_ft − W_base, truncated SVD, ΔW ≈ s·B·A.

For every targeted 2-D weight (out, in) the fine-tune changed::

    ΔW = W_ft − W_base                          (float32, one reused buffer)
    ΔW ≈ U_r S_r V_rᵀ                           (randomized range finder, or the full SVD)
    B = U_r √S_r (out, r),  A = √S_r V_rᵀ (r, in),  alpha = r  →  scale = alpha / r = 1

By Eckart–Young the best rank-r error is ``‖ΔW − ΔW_r‖²_F = Σ_{i>r} σᵢ²``; each module reports
``relative_error = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F`` computed directly from the written (cast) factors.
The rank is fixed (``rank``), the smallest keeping a fraction of ‖ΔW‖²_F (``energy``), the count
of σᵢ ≥ ``sv_threshold``, or a model-wide ``budget`` of total rank (the largest σᵢ² anywhere).

Checkpoints are streamed tensor by tensor (the next pair is read while this one is factored), so
peak memory is about one tensor pair plus the adapter. Tensors that differ but are not LoRA
targets (norms, biases, embeddings, lm_head) are reported, and carried as ``modules_to_save``
only when asked. Under torchrun the modules are shared round-robin across processes
(:mod:`loratools.ops.distributed`) and the main process gets the whole result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.linalg import Split, Svd, allocate_budget, exact_svd, randomized_svd, rank_for_energy
from loratools.ops import Progress, no_progress
from loratools.ops.distributed import Workers

__all__ = [
    "ExtractOptions",
    "ExtractPlan",
    "ExtractResult",
    "ModuleReport",
    "extract",
    "model_card",
    "plan_extraction",
]

DEFAULT_MAX_RANK = 64  # SVD width for --energy/--sv-threshold/--budget when --max-rank is not given
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|lm_head)(\.|$)")
REGEX_CHARS = set("*+?()[]{}|^$\\")


class TensorSource(Protocol):
    """What extraction reads from a checkpoint (:class:`loratools.io.checkpoint.Checkpoint`)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> Any: ...  # has .shape and .dtype

    def iter_tensors(self, names: list[str], prefetch: bool = True) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract; exactly one of ``rank``, ``energy``, ``sv_threshold``, ``budget``.

    Attributes:
        rank: the same rank r for every module (capped at min(out, in)).
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖²_F, in (0, 1].
        sv_threshold: per module, keep every singular value σᵢ ≥ this (absolute).
        budget: total rank over all modules, spent on the model-wide largest σᵢ².
        max_rank: cap per module for energy/sv_threshold/budget (default 64): the SVD computed.
        targets: PEFT ``target_modules``: leaf names (``q_proj``) or one full-match regex
            over module paths; None means every 2-D weight except embeddings and lm_head.
        exact: full SVD (``torch.linalg.svd``) instead of the randomized range finder.
        split: ``"sqrt"`` (B = U√S, A = √S Vᵀ) or ``"b"`` (B = U S, A = Vᵀ).
        alpha: LoRA alpha of every module; None means alpha = rank, so scale = 1.
        modules_to_save: carry norms/biases/untargeted weights that differ, in full.
        include_embeddings: carry embeddings and lm_head that differ (also grown vocabularies).
        dtype: output dtype; None keeps the fine-tune's float dtype.
        seed: seed of the randomized SVD's Gaussian sketch.
    """

    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None
    budget: int | None = None
    max_rank: int | None = None
    targets: tuple[str, ...] | None = None
    exact: bool = False
    split: Split = "sqrt"
    alpha: float | None = None
    modules_to_save: bool = False
    include_embeddings: bool = False
    dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        chosen = [f for f in ("rank", "energy", "sv_threshold", "budget") if getattr(self, f) is not None]
        if len(chosen) != 1:
            given = ", ".join(f"--{f.replace('_', '-')}" for f in chosen) or "none"
            raise LoratoolsError(
                f"choose exactly one of -r/--rank, --energy, --sv-threshold, --budget (got {given})"
            )
        checks = [
            (self.rank is None or self.rank >= 1, "-r/--rank must be at least 1"),
            (self.energy is None or 0 < self.energy <= 1, "--energy must be in (0, 1], e.g. 0.9"),
            (self.sv_threshold is None or self.sv_threshold >= 0, "--sv-threshold must be ≥ 0"),
            (self.budget is None or self.budget >= 1, "--budget must be at least 1"),
            (self.max_rank is None or self.max_rank >= 1, "--max-rank must be at least 1"),
            (
                self.max_rank is None or self.rank is None,
                "--max-rank goes with --energy/--sv-threshold/--budget",
            ),
            (self.alpha is None or self.alpha > 0, "--alpha must be positive"),
            (self.split in ("sqrt", "b"), "--split must be 'sqrt' or 'b'"),
            (not self.targets or all(self.targets), "--targets names must not be empty"),
        ]
        problems = [message for ok, message in checks if not ok]
        if self.targets and len(self.targets) == 1 and REGEX_CHARS & set(self.targets[0]):
            try:
                re.compile(self.targets[0])
            except re.error as exc:
                problems.append(f"--targets {self.targets[0]!r} is not a valid regex ({exc})")
        if problems:
            raise LoratoolsError("; ".join(problems))

    @property
    def rule(self) -> Literal["rank", "energy", "sv_threshold", "budget"]:
        for name in ("rank", "energy", "sv_threshold"):
            if getattr(self, name) is not None:
                return name  # type: ignore[return-value]
        return "budget"

    @property
    def width(self) -> int:
        """How many singular triplets to compute per module before choosing its rank."""
        return self.rank if self.rank is not None else (self.max_rank or DEFAULT_MAX_RANK)

    def targets_module(self, module: str) -> bool:
        """PEFT's rule: a one-entry regex must full-match the path; names match the path's tail."""
        if self.targets is None:
            return True
        if len(self.targets) == 1 and REGEX_CHARS & set(self.targets[0]):
            return re.fullmatch(self.targets[0], module) is not None
        return any(module == t or module.endswith("." + t) for t in self.targets)


# -- planning: which tensors to factor, compare or carry --------------------------------------------
Kind = Literal["lora", "embedding", "other"]


@dataclass(frozen=True)
class Item:
    """One tensor present in both checkpoints. ``kind``: factor it, or compare (and maybe carry) it."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    resized: bool = False  # an embedding whose fine-tune shape differs (grown vocabulary)


@dataclass(frozen=True)
class ExtractPlan:
    """What :func:`extract` will do, known from the headers alone.

    Attributes:
        items: tensors in both checkpoints, in the fine-tune's storage order.
        only_in_base: tensor names the fine-tune lacks.
        only_in_finetuned: tensor names the base lacks (new modules; not carried).
        dtype: the output dtype.
    """

    items: list[Item]
    only_in_base: list[str]
    only_in_finetuned: list[str]
    dtype: torch.dtype

    @property
    def lora_items(self) -> list[Item]:
        return [item for item in self.items if item.kind == "lora"]


def _kind(name: str, shape: tuple[int, ...], options: ExtractOptions) -> Kind:
    module = name.rsplit(".", 1)[0]
    if EMBEDDING.search(module):
        return "embedding"
    if len(shape) == 2 and name.endswith(".weight") and options.targets_module(module):
        return "lora"
    return "other"


def plan_extraction(base: TensorSource, finetuned: TensorSource, options: ExtractOptions) -> ExtractPlan:
    """Match tensors by name, classify them, and check shapes, before reading any data.

    Raises:
        ShapeMismatch: tensors whose shapes differ (all listed), except embeddings with
            ``include_embeddings``; or no tensor selected for LoRA.
    """
    base_names = set(base.names())
    items, bad = [], []
    for name in finetuned.names():
        if name not in base_names:
            continue
        shape, base_shape = tuple(finetuned.info(name).shape), tuple(base.info(name).shape)
        kind = _kind(name, shape, options)
        resized = shape != base_shape
        if resized and not (kind == "embedding" and options.include_embeddings):
            bad.append(f"{name} {list(base_shape)} → {list(shape)}")
        items.append(Item(name, kind, shape, resized))
    if bad:
        raise ShapeMismatch(
            f"base and fine-tune shapes differ: {list_problems(bad)}; a grown vocabulary is carried "
            "with --include-embeddings (resize the base's embeddings before loading), other tensors cannot be"
        )
    lora = [item for item in items if item.kind == "lora"]
    if not lora:
        raise LoratoolsError(
            f"no 2-D weight shared by base and fine-tune matches --targets {options.targets}; "
            "pass leaf names (q_proj) or a regex over module paths"
        )
    dtype = options.dtype or _float_dtype(finetuned.info(lora[0].name).dtype)
    ft_names = set(finetuned.names())
    only_base = [n for n in base.names() if n not in ft_names]
    only_ft = [n for n in finetuned.names() if n not in base_names]
    return ExtractPlan(items, only_base, only_ft, dtype)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32


# -- per-module math ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleReport:
    """One factored module: its rank, the energy its rank keeps, and the achieved error.

    ``energy_kept = Σ_{i≤r} σᵢ² / ‖ΔW‖²_F``; ``relative_error = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F``.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float
    relative_error: float
    delta_norm: float  # ‖ΔW‖_F


def truncated_spectrum(delta: torch.Tensor, width: int, options: ExtractOptions) -> Svd:
    """The top ``width`` singular triplets of ΔW (out, in), randomized unless ``options.exact``."""
    width = min(width, *delta.shape)
    if options.exact:
        return exact_svd(delta).truncate(width)
    return randomized_svd(delta, width, seed=options.seed)


def choose_rank(s: torch.Tensor, total: float, options: ExtractOptions) -> int:
    """The rank the options' rule picks from singular values ``s`` (descending) of a ΔW with ‖ΔW‖²_F = total."""
    if options.energy is not None:
        return rank_for_energy(s, options.energy, total)
    if options.sv_threshold is not None:
        return int((s >= options.sv_threshold).sum())
    return int(s.numel())  # fixed rank, or a budget's rank: the spectrum was computed at that width


def lora_from_svd(svd: Svd, rank: int, options: ExtractOptions, dtype: torch.dtype) -> LoraWeight:
    """LoRA factors of the rank-``rank`` truncation, scaled so that ``scale · B @ A = U_r S_r V_rᵀ``.

    With alpha = r (the default) scale = 1; with another alpha, 1/scale goes into the factors
    (split as √ on both sides for ``split="sqrt"``, all into B for ``split="b"``).
    """
    b, a = svd.truncate(rank).factors(options.split)  # (out, r), (r, in)
    alpha = float(rank) if options.alpha is None else options.alpha
    scale = alpha / rank
    if scale != 1.0 and options.split == "sqrt":
        b, a = b / math.sqrt(scale), a / math.sqrt(scale)
    elif scale != 1.0:
        b = b / scale
    return LoraWeight(a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous(), alpha)


def residual_norm(delta: torch.Tensor, weight: LoraWeight) -> float:
    """``‖ΔW − s·B·A‖_F`` in float32; overwrites ``delta`` (the buffer) with the residual."""
    b, a = weight.scaled_factors()  # (out, r), (r, in)
    delta.addmm_(b.to(delta.device), a.to(delta.device), alpha=-1.0)
    return float(torch.linalg.vector_norm(delta))


class DeltaBuffer:
    """One float32 buffer, reused for every ΔW: ``buf.copy_(w_ft).sub_(w_base)`` (no temporaries)."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.flat = torch.empty(numel, dtype=torch.float32, device=device)
        # on a GPU the base tensor is staged on the device first: sub_ cannot mix devices
        self.stage = torch.empty(numel, dtype=torch.float32, device=device) if device.type != "cpu" else None

    def delta(self, name: str, w_ft: torch.Tensor, w_base: torch.Tensor) -> tuple[torch.Tensor, float]:
        """ΔW (a view of the buffer) and ‖ΔW‖²_F; a NaN/Inf anywhere in ΔW is an error naming the tensor."""
        buf = self.flat[: w_ft.numel()].view(w_ft.shape)
        buf.copy_(w_ft)
        if self.stage is None:
            buf.sub_(w_base)
        else:
            buf.sub_(self.stage[: w_base.numel()].view(w_base.shape).copy_(w_base))
        norm = float(torch.linalg.vector_norm(buf))
        if not math.isfinite(norm):
            raise LoratoolsError(
                f"the difference of tensor {name} contains NaN or Inf; check that both checkpoints load "
                "(a diverged fine-tune, or a float16 overflow) before extracting"
            )
        return buf, norm * norm


# -- the streaming passes ------------------------------------------------------------------------------
@dataclass
class _Outcome:
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


def _spectra_pass(
    base: TensorSource,
    finetuned: TensorSource,
    items: list[Item],
    options: ExtractOptions,
    buffer: DeltaBuffer,
) -> _Outcome:
    """Budget pass 1: the top ``width`` singular values of every ΔW (factors are not kept)."""
    outcome = _Outcome()
    for name, w_ft, w_base in _pairs(base, finetuned, [i.name for i in items]):
        delta, total = buffer.delta(name, w_ft, w_base)
        if total > 0:
            outcome.spectra[name] = truncated_spectrum(delta, options.width, options).s.cpu()
    return outcome


def _factor(
    item: Item,
    delta: torch.Tensor,
    total: float,
    rank: int | None,
    options: ExtractOptions,
    dtype: torch.dtype,
) -> tuple[LoraWeight, ModuleReport] | None:
    """Factor one ΔW: compute its spectrum, choose the rank, write factors, measure the error."""
    svd = truncated_spectrum(delta, rank if rank is not None else options.width, options)
    chosen = choose_rank(svd.s, total, options) if rank is None else min(rank, svd.rank)
    if chosen == 0:
        return None
    weight = lora_from_svd(svd, chosen, options, dtype)
    energy = float(svd.s[:chosen].double().square().sum()) / total
    error = residual_norm(delta, weight) / math.sqrt(total)
    module = item.name.removesuffix(".weight")
    shape = (int(item.shape[0]), int(item.shape[1]))
    return weight, ModuleReport(module, shape, chosen, min(energy, 1.0), error, math.sqrt(total))


def _carry(
    item: Item, w_ft: torch.Tensor, w_base: torch.Tensor, options: ExtractOptions, lora_modules: set[str]
) -> str | None:
    """Why a non-LoRA tensor is left out (``"unchanged"``, or what would carry it); None: carry it."""
    if not item.resized and torch.equal(w_ft, w_base):
        return "unchanged"
    if item.name.rsplit(".", 1)[0] in lora_modules:
        return "differs, but its module gets LoRA factors; PEFT cannot also save it in full (not carried)"
    if item.kind == "embedding":
        return None if options.include_embeddings else "embedding/lm_head differs: pass --include-embeddings"
    return None if options.modules_to_save else "differs (not LoRA-able): pass --modules-to-save to carry it"


def _factor_pass(
    base: TensorSource,
    finetuned: TensorSource,
    items: list[Item],
    options: ExtractOptions,
    buffer: DeltaBuffer,
    dtype: torch.dtype,
    ranks: dict[str, int] | None,
    lora_modules: set[str],
    progress: Progress,
) -> _Outcome:
    """Factor every LoRA item (``ranks`` fixes them, for a budget) and compare the others."""
    outcome = _Outcome()
    by_name = {item.name: item for item in items}
    for name, w_ft, w_base in _pairs(base, finetuned, list(by_name)):
        item = by_name[name]
        if item.kind == "lora" and (ranks is None or ranks.get(name, 0) > 0):
            delta, total = buffer.delta(name, w_ft, w_base)
            rank = None if ranks is None else ranks[name]
            factored = _factor(item, delta, total, rank, options, dtype) if total > 0 else None
            if total == 0:
                outcome.skipped[name] = "unchanged"
            elif factored is None:
                outcome.skipped[name] = "no singular value above --sv-threshold"
            else:
                outcome.weights[name] = factored
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


def _merge(outcomes: list[_Outcome]) -> _Outcome:
    merged = _Outcome()
    for outcome in outcomes:
        merged.weights.update(outcome.weights)
        merged.saved.update(outcome.saved)
        merged.skipped.update(outcome.skipped)
        merged.spectra.update(outcome.spectra)
    return merged


def _run_everywhere(workers: Workers, work: Callable[[], _Outcome]) -> _Outcome:
    """Run ``work`` on this process's share and combine every process's outcome.

    An error on any process is raised on all of them (instead of leaving the others waiting).
    """
    try:
        mine: _Outcome | str = work()
    except LoratoolsError as exc:
        mine = str(exc)
    gathered = workers.all_gather(mine)
    errors = [item for item in gathered if isinstance(item, str)]
    if errors:
        raise LoratoolsError(errors[0])
    return _merge(gathered)


# -- the result -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractResult:
    """The extracted adapter and what happened to every tensor.

    Attributes:
        adapter: the LoRA factors (plus carried ``modules_to_save`` tensors).
        modules: one report per factored module, in checkpoint order.
        saved: tensor names carried in full.
        skipped: tensor name → why a changed tensor is not in the adapter.
        unchanged: tensors identical in both checkpoints.
        plan: what was matched (``only_in_base``/``only_in_finetuned``).
    """

    adapter: Adapter
    modules: list[ModuleReport]
    saved: list[str]
    skipped: dict[str, str]
    unchanged: list[str]
    plan: ExtractPlan

    @property
    def energy_kept(self) -> float:
        """Model-wide ``Σ kept σᵢ² / Σ ‖ΔW‖²_F`` over the factored modules."""
        total = sum(m.delta_norm**2 for m in self.modules)
        kept = sum(m.energy_kept * m.delta_norm**2 for m in self.modules)
        return kept / total if total > 0 else 1.0

    def summary(self, output: str) -> dict[str, Any]:
        """The ``--json`` document (DESIGN.md: output, modules[name, rank, relative_error], …)."""
        errors = [m.relative_error for m in self.modules]
        return {
            "output": output,
            "base": self.adapter.provenance.get("base"),
            "finetuned": self.adapter.provenance.get("finetuned"),
            "rule": self.adapter.provenance.get("rule"),
            "dtype": str(self.plan.dtype).removeprefix("torch."),
            "parameters": self.adapter.num_parameters,
            "energy_kept": self.energy_kept,
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "max_relative_error": max(errors, default=0.0),
            "modules": [
                {
                    "name": m.name,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "energy_kept": m.energy_kept,
                    "relative_error": m.relative_error,
                    "delta_norm": m.delta_norm,
                }
                for m in self.modules
            ],
            "saved": self.saved,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped.items()],
            "unchanged": len(self.unchanged),
            "only_in_base": self.plan.only_in_base,
            "only_in_finetuned": self.plan.only_in_finetuned,
        }


def _provenance(options: ExtractOptions, plan: ExtractPlan, base: str | None, finetuned: str | None) -> dict:
    rule_value = getattr(options, options.rule)
    return {
        "method": "extract",
        "base": base,
        "finetuned": finetuned,
        "rule": options.rule,
        options.rule: rule_value,
        "max_rank": None if options.rank is not None else options.width,
        "svd": "exact" if options.exact else "randomized",
        "seed": options.seed,
        "split": options.split,
        "alpha": options.alpha if options.alpha is not None else "rank",
        "targets": list(options.targets) if options.targets else None,
        "dtype": str(plan.dtype).removeprefix("torch."),
    }


def _result(
    plan: ExtractPlan, outcome: _Outcome, options: ExtractOptions, base: str | None, finetuned: str | None,
    task_type: str | None,
) -> ExtractResult:  # fmt: skip
    order = [item.name for item in plan.items]
    weights = {outcome.weights[n][1].name: outcome.weights[n][0] for n in order if n in outcome.weights}
    reports = [outcome.weights[n][1] for n in order if n in outcome.weights]
    if not weights:
        raise LoratoolsError(
            "no targeted weight differs between base and fine-tune (or every rank was 0); "
            "check the two paths, --targets and --sv-threshold"
        )
    provenance = _provenance(options, plan, base, finetuned)
    adapter = Adapter(
        weights=weights,
        saved_modules={n: outcome.saved[n] for n in order if n in outcome.saved},
        base_model=base,
        task_type=task_type,
        provenance=provenance,
    )
    result = ExtractResult(
        adapter=adapter,
        modules=reports,
        saved=[n for n in order if n in outcome.saved],
        skipped={n: r for n in order if (r := outcome.skipped.get(n)) and r != "unchanged"},
        unchanged=[n for n in order if outcome.skipped.get(n) == "unchanged"],
        plan=plan,
    )
    provenance["energy_kept"] = round(result.energy_kept, 6)
    return result


def extract(
    base: TensorSource,
    finetuned: TensorSource,
    options: ExtractOptions,
    *,
    plan: ExtractPlan | None = None,
    workers: Workers | None = None,
    progress: Progress = no_progress,
    base_model: str | None = None,
    finetuned_model: str | None = None,
    task_type: str | None = None,
) -> ExtractResult | None:
    """Extract a LoRA adapter: ΔW = W_ft − W_base ≈ s·B·A for every targeted module.

    Args:
        base: the base checkpoint.
        finetuned: the full fine-tune of ``base``.
        options: rank rule, SVD, factor split, carrying and dtype choices.
        plan: the result of :func:`plan_extraction` if already made.
        workers: this process's share of a torchrun job, and its device (default: one CPU process).
        progress: called with each tensor name when it is done.
        base_model: name of the base for the config and model card (``base_model_name_or_path``).
        finetuned_model: name of the fine-tune, recorded in the provenance.
        task_type: PEFT task type, e.g. ``CAUSAL_LM``.

    Returns:
        The adapter and per-module reports; None on processes other than rank 0 of a torchrun job.

    Raises:
        ShapeMismatch: shapes differ between the checkpoints (see :func:`plan_extraction`).
        LoratoolsError: NaN/Inf in a ΔW, a budget smaller than the number of modules, nothing to extract.

    Example:
        >>> result = extract(open_checkpoint("base"), open_checkpoint("ft"), ExtractOptions(rank=8))
        >>> result.adapter.ranks["model.layers.0.self_attn.q_proj"]
        8
    """
    plan = plan or plan_extraction(base, finetuned, options)
    workers = workers or Workers()
    mine = workers.share(plan.items)
    lora = [item for item in mine if item.kind == "lora"]
    buffer = DeltaBuffer(max((math.prod(i.shape) for i in lora), default=0), workers.device)
    ranks = None
    if options.budget is not None:
        spectra = _run_everywhere(
            workers, lambda: _spectra_pass(base, finetuned, lora, options, buffer)
        ).spectra
        if options.budget < len(spectra):
            raise LoratoolsError(
                f"--budget {options.budget} is less than the {len(spectra)} changed modules (each needs rank ≥ 1); "
                "raise it or narrow --targets"
            )
        ranks = allocate_budget(spectra, options.budget, max_rank=options.width)
    lora_modules = {item.name.rsplit(".", 1)[0] for item in plan.lora_items}
    outcome = _run_everywhere(
        workers,
        lambda: _factor_pass(
            base, finetuned, mine, options, buffer, plan.dtype, ranks, lora_modules, progress
        ),
    )
    if not workers.is_main:
        return None
    return _result(plan, outcome, options, base_model, finetuned_model, task_type)


def model_card(result: ExtractResult) -> str:
    """A README.md for the adapter: what it was extracted from, how, its ranks and the energy kept."""
    p = result.adapter.provenance
    ranks = sorted({m.rank for m in result.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per module, rank_pattern)"
    errors = [m.relative_error for m in result.modules]
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {p['base']}"] if p.get("base") else []),
        "tags: [lora, loratools, extracted]",
        "---",
        "",
        "# LoRA adapter extracted with loratools",
        "",
        f"Extracted from the full fine-tune `{p.get('finetuned')}` of the base `{p.get('base')}`: for each",
        "targeted weight, ΔW = W_ft − W_base was factored by a truncated SVD into ΔW ≈ (alpha/r)·B·A.",
        "",
        "| | |",
        "|---|---|",
        f"| modules | {len(result.modules)} |",
        f"| rank | {rank_text} |",
        f"| rank rule | {p['rule']} = {p[p['rule']]} |",
        f"| SVD | {p['svd']} (seed {p['seed']}), split {p['split']} |",
        f"| energy kept (Σ kept σ² / Σ ‖ΔW‖²) | {result.energy_kept:.4f} |",
        f"| relative error ‖ΔW − sBA‖/‖ΔW‖ | mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g} |",
        f"| dtype | {p['dtype']} |",
        f"| modules saved in full | {len(result.saved)} |",
        "",
        "Load it with PEFT: `PeftModel.from_pretrained(base_model, this_folder)`.",
        "",
    ]
    return "\n".join(lines)
