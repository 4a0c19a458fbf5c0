"""Singular-value spectra of weight updates: is ΔW really low-rank? (Hu et al., 2021, Sections 4.1, 7)

Two sources of a weight update Δ (out × in) per module:

- an adapter: ``Δ = s·B·A`` whose SVD comes from QR(B), QR(Aᵀ) and an r×r core —
  O((out + in)·r²), never the out×in product (:func:`loratools.linalg.factored_svd`, or
  :func:`factored_singular_values` when the vectors are not needed);
- a full fine-tune: ``ΔW = W_ft − W_base``, streamed one tensor pair at a time, with the top-k
  singular values by randomized SVD and the exact ``‖ΔW‖²_F``, so energy fractions are exact
  even when only the top of the spectrum is computed.

Per module, with σ₁ ≥ σ₂ ≥ … the singular values and ``E = ‖Δ‖²_F = Σ σᵢ²``:

- energy kept at rank r: ``e(r) = Σ_{i≤r} σᵢ² / E`` (the best rank-r approximation keeps exactly
  this, by Eckart–Young);
- effective rank at f: the smallest r with ``e(r) ≥ f`` (None when the computed top of the
  spectrum does not reach f);
- stable rank: ``E / σ₁² = ‖Δ‖²_F / ‖Δ‖²₂``, between 1 and rank(Δ).

With a base model, an adapter's modules also get the paper's amplification factor (Section 7.3):
``‖Δ‖_F / ‖Uᵀ W0 V‖_F`` with U, V the top-r singular vectors of Δ, beside the same ratio for
random orthonormal U, V.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from loratools import linalg
from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.formats.names import resolve_modules
from loratools.ops import Progress, no_progress

__all__ = [
    "ENERGY_LEVELS",
    "Amplification",
    "ModuleSpectrum",
    "SpectrumOptions",
    "SpectrumReport",
    "TensorSource",
    "adapter_spectrum",
    "amplification",
    "delta_spectrum",
    "factored_singular_values",
    "plan_delta",
    "summarize",
]

ENERGY_LEVELS = (0.9, 0.99)  # the effective ranks every report carries


class TensorSource(Protocol):
    """What the ops need of a checkpoint (``loratools.io.checkpoint.Checkpoint`` fits)."""

    def names(self) -> list[str]: ...
    def info(self, name: str) -> Any: ...
    def iter_tensors(
        self, names: Iterable[str] | None = None, prefetch: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class SpectrumOptions:
    """How spectra are computed.

    Attributes:
        top: singular values per module for a full fine-tune's ΔW (randomized SVD); ignored for
            adapters, whose spectra are always complete.
        exact: full SVD of each ΔW instead (complete spectra; O(d·k·min(d, k)) each).
        include: a regular expression; only tensors whose name it matches (``re.search``) are
            compared in the BASE FINETUNED form. None: every 2-D tensor in both checkpoints.
        seed: seed of the randomized SVD sketch and of the random directions (amplification).
        device: where the math runs.
    """

    top: int = 64
    exact: bool = False
    include: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.top < 1:
            raise LoratoolsError(f"--top {self.top}: must be at least 1")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as exc:
                raise LoratoolsError(f"--include {self.include!r}: not a regular expression ({exc})") from exc


@dataclass(frozen=True)
class Amplification:
    """How much Δ amplifies directions of W0 (the paper's Section 7.3, Table 7).

    Attributes:
        rank: r, the number of top singular directions of Δ used.
        delta_norm: ``‖Δ‖_F``.
        projection: ``‖Uᵀ W0 V‖_F`` with U (out, r), V (in, r) the top-r singular vectors of Δ.
        random_projection: the same for random orthonormal U, V (mean over a few draws).
        base_projection: the same for W0's own top-r singular vectors: ``sqrt(Σ_{i≤r} σᵢ(W0)²)``.
    """

    rank: int
    delta_norm: float
    projection: float
    random_projection: float
    base_projection: float

    @property
    def factor(self) -> float:
        """``‖Δ‖_F / ‖Uᵀ W0 V‖_F``: large means Δ boosts directions W0 barely uses."""
        return self.delta_norm / self.projection if self.projection > 0 else float("inf")

    @property
    def random_factor(self) -> float:
        """``‖Δ‖_F / ‖U_rᵀ W0 V_r‖_F`` for random directions, the paper's baseline."""
        return self.delta_norm / self.random_projection if self.random_projection > 0 else float("inf")

    def to_dict(self) -> dict[str, float]:
        return {
            "rank": self.rank,
            "delta_norm": self.delta_norm,
            "projection": self.projection,
            "random_projection": self.random_projection,
            "base_projection": self.base_projection,
            "factor": self.factor,
            "random_factor": self.random_factor,
        }


@dataclass(frozen=True)
class ModuleSpectrum:
    """The spectrum of one module's update Δ (out × in).

    Attributes:
        name: module path (a tensor name without ``.weight``).
        shape: ``(out, in)``.
        singular_values: σ₁ ≥ σ₂ ≥ …, float64 on the CPU — all of them, or the top k.
        energy: ``‖Δ‖²_F``, exact even when ``singular_values`` is only the top of the spectrum.
        complete: ``singular_values`` holds every non-zero singular value.
        amplification: Section 7.3's measure, when a base model was given.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    energy: float
    complete: bool
    amplification: Amplification | None = None

    @property
    def stable_rank(self) -> float:
        """``‖Δ‖²_F / σ₁²``."""
        return linalg.stable_rank(self.singular_values, self.energy)

    def energy_at(self, rank: int) -> float | None:
        """``e(r) = Σ_{i≤r} σᵢ² / ‖Δ‖²_F``; None when r exceeds a truncated spectrum."""
        s = self.singular_values
        if rank > len(s) and not self.complete:
            return None
        if len(s) == 0 or self.energy <= 0:
            return 1.0
        return float(linalg.energy_curve(s[:rank], self.energy)[-1])

    def effective_rank(self, fraction: float) -> int | None:
        """Smallest r with ``e(r) ≥ fraction``; None when the computed top does not reach it."""
        s = self.singular_values
        if self.energy <= 0:
            return 0  # a zero update (an untrained adapter's B = 0) needs no rank at all
        r = linalg.rank_for_energy(s, fraction, self.energy)
        if not self.complete and r == len(s) and (self.energy_at(r) or 0.0) < fraction - 1e-12:
            return None
        return r

    def energy_ranks(self) -> list[int]:
        """The ranks 1, 2, 4, 8, … up to the computed spectrum's length."""
        ranks, r = [], 1
        while r <= len(self.singular_values):
            ranks.append(r)
            r *= 2
        return ranks

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "singular_values": self.singular_values.tolist(),
            "frobenius_norm": self.energy**0.5,
            "stable_rank": self.stable_rank,
            "effective_rank": {str(f): self.effective_rank(f) for f in ENERGY_LEVELS},
            "energy_at": {str(r): self.energy_at(r) for r in self.energy_ranks()},
            "complete": self.complete,
        }
        if self.amplification is not None:
            doc["amplification"] = self.amplification.to_dict()
        return doc


@dataclass(frozen=True)
class SpectrumReport:
    """Spectra of every module, plus what they were computed from.

    Attributes:
        source: ``"adapter"`` (Δ = s·B·A) or ``"checkpoints"`` (ΔW = W_ft − W_base).
        modules: one spectrum per module, in model order.
        unchanged: tensors whose ΔW is exactly zero (left out of ``modules``).
        skipped: tensors present in only one of the two checkpoints.
        settings: how the spectra were computed (for the record).
    """

    source: str
    modules: list[ModuleSpectrum]
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Grouped by module type and by layer, and model-wide (see :func:`summarize`)."""
        return summarize(self.modules, ENERGY_LEVELS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "settings": self.settings,
            "modules": [m.to_dict() for m in self.modules],
            "summary": self.summary(),
            "unchanged": self.unchanged,
            "skipped": self.skipped,
        }


# -- adapters ---------------------------------------------------------------------------------
def adapter_spectrum(
    adapter: Adapter,
    options: SpectrumOptions | None = None,
    *,
    base: TensorSource | None = None,
    progress: Progress = no_progress,
) -> SpectrumReport:
    """Exact spectra of every module's ``Δ = s·B·A``, computed in factored form.

    Args:
        adapter: the adapter.
        options: seed and device (``top``/``exact`` do not apply: factored spectra are exact).
        base: the base model; adds each module's amplification factor.
        progress: called once per module.

    Returns:
        A report with complete spectra (r values per module).

    Raises:
        MissingKeys: a module that matches no base tensor.
        ShapeMismatch: a base tensor whose shape is not the module's.
    """
    options = options or SpectrumOptions()
    w0s = _base_weights(adapter, base) if base is not None else None
    modules = []
    # only tiny kernels without a base: one thread for the whole loop (toggling costs ~10 ms);
    # with a base, the d×k products of the amplification want every thread
    with _one_thread(options.device if base is None else torch.device("meta")):
        for name, weight in adapter.weights.items():
            modules.append(_adapter_module(name, weight, options, w0s, adapter.fan_in_fan_out))
            progress(name)
    settings = {"method": "factored", "seed": options.seed, "amplification": base is not None}
    return SpectrumReport("adapter", modules, settings=settings)


def _adapter_module(
    name: str,
    weight: LoraWeight,
    options: SpectrumOptions,
    w0s: Iterator[torch.Tensor] | None,
    fan_in_fan_out: bool,
) -> ModuleSpectrum:
    """One module's factored spectrum, and its amplification when base weights come along."""
    b, a = (t.to(options.device) for t in weight.scaled_factors())  # (out, r), (r, in)
    if w0s is None:
        s, amp = factored_singular_values(b, a).double().cpu(), None
    else:  # the amplification needs the singular vectors too
        svd = linalg.factored_svd(b, a)
        w0 = next(w0s).to(options.device)
        s, amp = svd.s.double().cpu(), amplification(svd, w0.T if fan_in_fan_out else w0, seed=options.seed)
    return ModuleSpectrum(name, weight.shape, s, float(s.square().sum()), True, amp)


def factored_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` alone: :func:`linalg.factored_svd` without the vectors.

    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ`` with orthonormal Q's, so the σ of B·A are those of the small
    core ``R_b R_aᵀ``. Only the R factors are needed (Householder QR without forming Q) and no
    (d, r) products follow: about 3× fewer flops than the full factored SVD at d = 4096, r = 64.

    Args:
        b: (d, r).
        a: (r, k).

    Returns:
        (min(r, d, k),) descending, in b's float dtype.
    """
    r_b = torch.linalg.qr(b, mode="r").R  # (min(d, r), r)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(k, r), r)
    return torch.linalg.svdvals(r_b @ r_a.T)  # core (min(d, r), min(k, r))


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run tiny CPU kernels on one thread.

    The factored SVD is a few O((d + k)·r²) kernels; with several OpenMP threads their fork/join
    overhead dominates, and on a busy machine each barrier waits for time slices: measured on a
    shared 2-core box, 150 ms per 256×16 module with 2 threads against 0.1 ms with one.
    """
    if device.type != "cpu":  # GPUs, and callers that opt out with the meta device
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _base_weights(adapter: Adapter, base: TensorSource) -> Iterator[torch.Tensor]:
    """The base tensors of the adapter's modules, in module order, checked for shape first."""
    tensor_of = resolve_modules(adapter.modules, base.names())
    problems = []
    for module, tensor in tensor_of.items():
        want = adapter.weights[module].shape
        want = want[::-1] if adapter.fan_in_fan_out else want
        got = tuple(base.info(tensor).shape)
        if got != tuple(want):
            problems.append(f"{module}: adapter {tuple(want)} vs base {tensor} {got}")
    if problems:
        raise ShapeMismatch(
            f"adapter and base do not fit: {list_problems(problems)}; is this the adapter's base model?"
        )
    return (tensor for _, tensor in base.iter_tensors(tensor_of.values()))


def amplification(svd: linalg.Svd, w0: torch.Tensor, *, seed: int = 0, draws: int = 4) -> Amplification:
    """The paper's amplification factor of Δ on W0 (Section 7.3).

    ``‖Δ‖_F / ‖Uᵀ W0 V‖_F`` where ``Δ = U S Vᵀ`` (top-r, from ``svd``); the random baseline uses
    U, V from QR of Gaussian matrices; W0's own top-r directions give ``sqrt(Σ_{i≤r} σᵢ(W0)²)``.

    Args:
        svd: the SVD of Δ: u (out, r), s (r,), vh (r, in).
        w0: the base weight, (out, in), in Δ's layout.
        seed: seed of the random directions.
        draws: random (U, V) pairs averaged.
    """
    w0 = w0.to(svd.u.dtype)
    r = svd.rank

    def projected(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(u.T @ w0 @ v))  # ‖(r, out)(out, in)(in, r)‖_F

    gen = torch.Generator(device=w0.device).manual_seed(seed)
    randoms = []
    for _ in range(draws):
        u = torch.linalg.qr(torch.randn(w0.shape[0], r, generator=gen, device=w0.device)).Q  # (out, r)
        v = torch.linalg.qr(torch.randn(w0.shape[1], r, generator=gen, device=w0.device)).Q  # (in, r)
        randoms.append(projected(u.to(w0.dtype), v.to(w0.dtype)))
    top_w0 = linalg.randomized_svd(w0, r, seed=seed).s
    return Amplification(
        rank=r,
        delta_norm=float(svd.s.double().square().sum()) ** 0.5,
        projection=projected(svd.u, svd.vh.T),
        random_projection=sum(randoms) / draws,
        base_projection=float(top_w0.double().square().sum()) ** 0.5,
    )


# -- full fine-tunes --------------------------------------------------------------------------
def plan_delta(
    base: TensorSource, finetuned: TensorSource, include: str | None = None
) -> tuple[list[str], list[str]]:
    """Which tensors to compare: 2-D tensors in both checkpoints (matching ``include``).

    Returns:
        ``(names, skipped)``: names in the fine-tune's order; tensors found in only one side.

    Raises:
        ShapeMismatch: tensors whose shapes differ between the two, all listed at once.
    """
    pattern = re.compile(include) if include else None
    base_names = set(base.names())
    ft_names = finetuned.names()
    wanted = [n for n in ft_names if pattern is None or pattern.search(n)]
    only_base = {n for n in base_names - set(ft_names) if pattern is None or pattern.search(n)}
    skipped = sorted({n for n in wanted if n not in base_names} | only_base)
    names, problems = [], []
    for name in (n for n in wanted if n in base_names):
        shape_b, shape_f = tuple(base.info(name).shape), tuple(finetuned.info(name).shape)
        if shape_b != shape_f:
            problems.append(f"{name}: base {shape_b} vs fine-tune {shape_f}")
        elif len(shape_f) == 2:
            names.append(name)
    if problems:
        raise ShapeMismatch(
            f"base and fine-tune differ in shape: {list_problems(problems)}; are they the same architecture?"
        )
    return names, skipped


def delta_spectrum(
    base: TensorSource,
    finetuned: TensorSource,
    options: SpectrumOptions | None = None,
    *,
    names: Sequence[str] | None = None,
    progress: Progress = no_progress,
) -> SpectrumReport:
    """Spectra of ``ΔW = W_ft − W_base`` per tensor, streamed one pair at a time.

    Each ΔW is formed once in a reused float32 buffer; ``‖ΔW‖²_F`` is exact; the top-k singular
    values come from a randomized SVD (``options.exact``: a full SVD). When k ≥ min(d, k') the
    full SVD is used and the spectrum is complete. Peak memory: about one tensor pair plus ΔW.

    Args:
        base: the base checkpoint.
        finetuned: the fine-tuned checkpoint.
        options: top, exact, include, seed, device.
        names: tensors to compare (default: :func:`plan_delta`).
        progress: called once per tensor.

    Raises:
        ShapeMismatch: see :func:`plan_delta`.
    """
    options = options or SpectrumOptions()
    skipped: list[str] = []
    if names is None:
        names, skipped = plan_delta(base, finetuned, options.include)
    buffer = torch.empty(0, dtype=torch.float32, device=options.device)
    modules, unchanged = [], []
    pairs = zip(base.iter_tensors(names), finetuned.iter_tensors(names), strict=True)
    for (name, w_base), (_, w_ft) in pairs:
        if buffer.numel() < w_ft.numel():
            buffer = torch.empty(w_ft.numel(), dtype=torch.float32, device=options.device)
        delta = buffer[: w_ft.numel()].view(w_ft.shape)  # (out, in)
        delta.copy_(w_ft).sub_(w_base.to(options.device))  # no float32 copies of either input
        spectrum = _delta_module(name.removesuffix(".weight"), delta, options)
        if spectrum is None:
            unchanged.append(name)
        else:
            modules.append(spectrum)
        progress(name)
    method = "exact" if options.exact else "randomized"
    settings = {"method": method, "top": options.top, "seed": options.seed}
    return SpectrumReport("checkpoints", modules, unchanged, skipped, settings)


def _delta_module(name: str, delta: torch.Tensor, options: SpectrumOptions) -> ModuleSpectrum | None:
    """One ΔW's spectrum; None when ΔW is exactly zero."""
    energy = float(torch.linalg.vector_norm(delta)) ** 2  # float32 reduction: no float64 copy of ΔW
    if energy == 0.0:
        return None
    full = options.exact or options.top >= min(delta.shape)
    if full:
        s = torch.linalg.svdvals(delta)
        energy = float(s.double().square().sum())  # the same up to rounding; keeps e(rank) = 1
    else:
        s = linalg.randomized_svd(delta, options.top, seed=options.seed).s
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    return ModuleSpectrum(name, shape, s.double().cpu(), energy, complete=full)


# -- summaries --------------------------------------------------------------------------------
_LAYER = re.compile(r"\.(\d+)\.")


def module_type(name: str) -> str:
    """The leaf of a module path: ``model.layers.3.self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> str:
    """The first number in a module path (its block), or ``"-"`` for modules outside the blocks."""
    match = _LAYER.search(name + ".")
    return match.group(1) if match else "-"


def summarize(modules: Sequence[ModuleSpectrum], levels: Sequence[float] = ENERGY_LEVELS) -> dict[str, Any]:
    """Group summaries by module type, by layer, and for the whole model (see :func:`group_summary`)."""
    by_type: dict[str, list[ModuleSpectrum]] = {}
    by_layer: dict[str, list[ModuleSpectrum]] = {}
    for m in modules:
        by_type.setdefault(module_type(m.name), []).append(m)
        by_layer.setdefault(layer_of(m.name), []).append(m)
    layers = sorted(by_layer, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    return {
        "by_type": {k: group_summary(v, levels) for k, v in by_type.items()},
        "by_layer": {k: group_summary(by_layer[k], levels) for k in layers},
        "model": group_summary(modules, levels),
    }


def _cumulative(modules: Sequence[ModuleSpectrum]) -> torch.Tensor:
    """``C[m, r-1] = Σ_{i≤r} σ_{m,i}²`` for r = 1…L (L the longest spectrum); a complete spectrum
    is extended by its total, a truncated one by NaN (unknown). Shape (M, L)."""
    length = max(len(m.singular_values) for m in modules)
    out = torch.full((len(modules), length), float("nan"), dtype=torch.float64)
    for row, m in enumerate(modules):
        cum = m.singular_values.double().square().cumsum(0)
        out[row, : len(cum)] = cum
        if m.complete:
            out[row, len(cum) :] = m.energy
    return out


def group_summary(
    modules: Sequence[ModuleSpectrum], levels: Sequence[float] = ENERGY_LEVELS
) -> dict[str, Any]:
    """What a group of modules needs, pooled: energies add across modules.

    - ``energy_at[r]``: ``Σ_m Σ_{i≤r} σ_{m,i}² / Σ_m ‖Δ_m‖²_F`` — the share of the group's update a
      rank-r LoRA on every module keeps (None past a truncated spectrum);
    - ``uniform_rank[f]``: the smallest such r keeping f;
    - ``total_rank[f]``: the smallest total rank (summed over modules, given to the largest σ²
      model-wide first) keeping f — what an energy-budgeted resize would need;
    - ``effective_rank_max`` / ``_median``: of the per-module effective ranks; ``stable_rank_mean``.
    """
    if not modules:
        return {"modules": 0}
    energy = sum(m.energy for m in modules)
    pooled = _cumulative(modules).sum(0) / energy if energy > 0 else torch.ones(1, dtype=torch.float64)
    ranks = [r for r in (2**i for i in range(32)) if r <= len(pooled)]
    squares = torch.cat([m.singular_values.double().square() for m in modules]).sort(descending=True).values
    budget = squares.cumsum(0) / energy if energy > 0 else torch.ones(1, dtype=torch.float64)
    doc: dict[str, Any] = {
        "modules": len(modules),
        "energy": energy,
        "stable_rank_mean": sum(m.stable_rank for m in modules) / len(modules),
        "energy_at": {str(r): _known(pooled[r - 1]) for r in ranks},
        "uniform_rank": {str(f): _first_reaching(pooled, f) for f in levels},
        "total_rank": {str(f): _first_reaching(budget, f) for f in levels},
    }
    for f in levels:
        effective = [m.effective_rank(f) for m in modules]
        known = sorted(e for e in effective if e is not None)
        complete = len(known) == len(effective)
        doc.setdefault("effective_rank_max", {})[str(f)] = known[-1] if complete else None
        doc.setdefault("effective_rank_median", {})[str(f)] = known[len(known) // 2] if complete else None
    return doc


def _known(value: torch.Tensor) -> float | None:
    return None if torch.isnan(value) else float(value)


def _first_reaching(curve: torch.Tensor, fraction: float) -> int | None:
    """1 + the first index where ``curve ≥ fraction`` (NaN never reaches); None if none does."""
    reached = torch.nonzero(curve >= fraction - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else None
