"""Pure linear algebra on tensors: truncated SVDs, factored SVDs of low-rank products, energy.

Everything here takes tensors and returns tensors (float32 unless stated), never touches files and
never forms a dense d×k matrix where a factored form works:

- :func:`randomized_svd` — Halko, Martinsson & Tropp (2011): a Gaussian sketch, power iterations
  with QR re-orthonormalisation, and a small SVD. O(d·k·(r+p)) per iteration instead of
  O(d·k·min(d, k)) for a full SVD. Iterates until the rank-r error stops improving. Where
  bfloat16 products are much faster (:func:`range_dtype`: CUDA, AMX) the iterations multiply a
  bfloat16 copy of M and at least one float32 iteration on M itself finishes them: float32
  accuracy, most products in bfloat16. On the CPU, products go through oneDNN
  (:func:`_onednn_linear`).
- :func:`factored_svd` — the SVD of ``B @ A`` (B: d×r, A: r×k) from QR(B), QR(Aᵀ) and the SVD of
  an r×r core: O((d + k)·r²).
- energy helpers: ``‖M‖²_F = Σ σᵢ²``; the best rank-r error is ``Σ_{i>r} σᵢ²`` (Eckart–Young).
- :func:`lora_from_svd` — the LoRA module of a truncated SVD (the one place factors are cut).
- :class:`RankRule` — how each module's rank is chosen from its singular values (a fixed rank,
  an energy fraction, a singular-value threshold, or a rank budget over all modules), validated
  once for extract, resize, combine and convert.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from loratools.adapter import LoraWeight
from loratools.errors import InvalidOptions, LoratoolsError

__all__ = [
    "RULES",
    "RankRule",
    "RuleName",
    "Split",
    "Svd",
    "allocate_budget",
    "batched_randomized_svd",
    "energy_curve",
    "energy_kept",
    "exact_svd",
    "factored_svd",
    "factored_svd_sum",
    "frobenius",
    "lora_from_svd",
    "randomized_svd",
    "range_dtype",
    "rank_for_energy",
    "squared_norms",
    "stable_rank",
]

Split = Literal["sqrt", "b"]


@dataclass(frozen=True)
class Svd:
    """A (possibly truncated) SVD ``M ≈ u @ diag(s) @ vh``: u (d, r), s (r,) descending, vh (r, k)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def truncate(self, rank: int) -> Svd:
        """The leading ``rank`` triplets."""
        return Svd(self.u[:, :rank], self.s[:rank], self.vh[:rank])

    def factors(self, split: Split = "sqrt", scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors ``(B, A)`` with ``scale · B @ A = u diag(s) vh``.

        Args:
            split: ``"sqrt"`` puts √S on both sides (B = U√S, A = √S Vᵀ — balanced norms, what
                training would find); ``"b"`` puts S in B (B = U S, A = Vᵀ with orthonormal rows).
            scale: the LoRA scale the factors will be multiplied by (alpha / r); 1/scale is
                folded in, as √ on both sides for ``"sqrt"``, all into B for ``"b"``.

        Returns:
            B (d, r) and A (r, k).
        """
        if split == "sqrt":
            root = self.s.sqrt()
            b, a = self.u * root, root[:, None] * self.vh  # (d, r), (r, k)
            if scale != 1.0:
                b, a = b / math.sqrt(scale), a / math.sqrt(scale)
            return b, a
        if split == "b":
            return (self.u * self.s if scale == 1.0 else self.u * self.s / scale), self.vh
        raise ValueError(f"unknown split {split!r}: use 'sqrt' or 'b'")


def lora_from_svd(
    svd: Svd, rank: int, split: Split, dtype: torch.dtype, alpha: float | None = None
) -> LoraWeight:
    """A LoRA module for the top ``rank`` triplets of ``svd``: ``scale · B @ A = U_r S_r V_rᵀ``.

    Args:
        svd: u (d, R), s (R,), vh (R, k), any device.
        rank: how many triplets to keep (≤ R).
        split: how S is shared between B and A (:meth:`Svd.factors`).
        dtype: dtype of the factors, which are returned on the CPU.
        alpha: the module's LoRA alpha; None means alpha = rank (scale 1). Otherwise 1/scale
            goes into the factors.

    Returns:
        LoraWeight with A (rank, k), B (d, rank).
    """
    alpha = float(rank) if alpha is None else alpha
    b, a = svd.truncate(rank).factors(split, alpha / rank)  # (d, rank), (rank, k)
    return LoraWeight(a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous(), alpha)


def exact_svd(m: torch.Tensor) -> Svd:
    """Full thin SVD of ``m`` (d, k) in float32 (or the input's float64)."""
    u, s, vh = torch.linalg.svd(_as_float(m), full_matrices=False)
    return Svd(u, s, vh)


def _as_float(m: torch.Tensor) -> torch.Tensor:
    return m if m.dtype in (torch.float32, torch.float64) else m.float()


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _project(z: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of M restricted to the column space of ``q``, from ``z = Mᵀ Q``: M ≈ Q (Qᵀ M) = Q zᵀ.

    Batched: z (b, k, l), q (b, d, l). The SVD of the wide zᵀ (l, k) comes from ``z = Q_z R_z``
    and the SVD of the small ``R_zᵀ = U S Wᵀ`` (l, l): ``zᵀ = U S (Q_z W)ᵀ`` — 3–4× faster than a
    LAPACK SVD of the wide matrix. Returns u (b, d, l), s (b, l), vh (b, l, k).
    """
    q_z, r_z = torch.linalg.qr(z)  # (b, k, l), (b, l, l)
    u_small, s, w_h = torch.linalg.svd(r_z.mT)  # (b, l, l), (b, l), (b, l, l)
    return q @ u_small, s, w_h @ q_z.mT


def range_dtype(device: torch.device) -> torch.dtype:
    """The dtype :func:`batched_randomized_svd`'s range finder multiplies in on ``device``.

    bfloat16 where its products are several times faster than float32 ones: CUDA (tensor cores)
    and CPUs with AMX tiles. The range finder only has to find a subspace; the last subspace
    iteration and the projection are float32 (:func:`batched_randomized_svd`). Float32 elsewhere —
    also with AVX-512 BF16 alone, where bf16 products are only 1.5–2× oneDNN's float32 ones
    (:func:`_onednn_linear`) and the float32 polish takes the gain back: an extract measured the
    same either way (0.66 B pair 2.1–2.2 s float32, 2.3 s bf16; 7 B cold 23.6 s and 23.8 s).
    """
    if device.type == "cuda" or (device.type == "cpu" and _cpu_has_amx()):
        return torch.bfloat16
    return torch.float32


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; missing in older torch
    return bool(probe()) if probe is not None else False


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    niter: int = 1,
    rtol: float = 1e-3,
    max_iter: int = 12,
    seed: int = 0,
    range_copy: torch.Tensor | None = None,
) -> Svd:
    """Rank-``rank`` truncated SVD of ``m`` (d, k) by a randomized range finder.

    :func:`batched_randomized_svd` of the one-matrix stack ``m[None]`` (the algorithm is written
    once, there).

    Args:
        m: the matrix, (d, k); upcast to float32.
        rank: how many singular triplets to return.
        oversample: extra sketch columns p (Halko et al. suggest 5–10).
        niter: power iterations always done before the residual is checked.
        rtol: stop when one iteration improves the squared residual by less than this fraction.
        max_iter: hard cap on power iterations.
        seed: seed of the Gaussian sketch (results are deterministic for a given seed/device).
        range_copy: ``m`` rounded to the dtype the range finder multiplies in (a caller's reused
            buffer); None: made here in :func:`range_dtype`. Pass ``m`` itself for float32 throughout.

    Returns:
        Svd with u (d, rank), s (rank,), vh (rank, k).

    Example:
        >>> svd = randomized_svd(torch.randn(512, 256), 8)
        >>> b, a = svd.factors()  # (512, 8), (8, 256)
    """
    copy = None if range_copy is None else range_copy[None]
    return batched_randomized_svd(
        m[None],
        rank,
        oversample=oversample,
        niter=niter,
        rtol=rtol,
        max_iter=max_iter,
        seed=seed,
        range_copy=copy,
    )[0]


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> Svd:
    """Exact SVD of the product ``b @ a`` without forming it.

    With ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``: ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; an SVD of the small
    core ``R_b R_aᵀ = U_c S V_cᵀ`` gives ``U = Q_b U_c`` and ``Vᵀ = V_cᵀ Q_aᵀ``. Cost
    O((d + k)·r²) against O(d·k·min(d, k)) for the dense product.

    Args:
        b: (d, r).
        a: (r, k).

    Returns:
        Svd with u (d, r'), s (r',), vh (r', k), r' = min(r, d, k); singular values descending.
    """
    b, a = _as_float(b), _as_float(a)
    q_b, r_b = torch.linalg.qr(b)  # (d, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (k, r), (r, r)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (r, r) core; thin if r > d or k
    return Svd(q_b @ u_c, s, vh_c @ q_a.T)


def factored_svd_sum(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Svd:
    """Exact SVD of ``Σᵢ Bᵢ @ Aᵢ``: the factored SVD of ``[B₁|B₂|…] @ [A₁; A₂; …]``."""
    b = torch.cat([_as_float(b) for b, _ in pairs], dim=1)  # (d, Σr)
    a = torch.cat([_as_float(a) for _, a in pairs], dim=0)  # (Σr, k)
    return factored_svd(b, a)


def squared_norms(m: torch.Tensor) -> torch.Tensor:
    """``‖Mᵢ‖²_F`` of every matrix of a stack m (b, …, k), (b,) float64, accurate at any size.

    Float32 norms of the rows (each at most k terms), squared and summed in float64. torch's
    float32 ``vector_norm`` of a whole matrix accumulates in one float: −0.35 % at 45 M elements
    (an 11008×4096 ΔW), −0.07 % at 16.8 M — enough to misreport an error, or a residual
    ``‖M‖² − Σσᵢ²`` of a few percent of ‖M‖² by a tenth of itself.
    """
    rows = m.reshape(m.shape[0], -1, m.shape[-1])  # (b, rows, k)
    dtype = m.dtype if m.dtype in (torch.float32, torch.float64) else torch.float32  # bf16 rows in float32
    return torch.linalg.vector_norm(rows, dim=-1, dtype=dtype).double().square().sum(dim=-1)


def frobenius(m: torch.Tensor) -> float:
    """``‖M‖_F`` of a tensor of any shape, accurate at any size (see :func:`squared_norms`)."""
    if m.numel() == 0:
        return 0.0
    return math.sqrt(float(squared_norms(m[None] if m.ndim > 1 else m.reshape(1, 1, -1))[0]))


def energy_curve(s: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Cumulative energy kept by the top 1, 2, … singular values: ``Σ_{i≤r} σᵢ² / ‖M‖²_F``.

    Args:
        s: singular values, descending.
        total: ``‖M‖²_F`` when ``s`` is only the top of the spectrum; defaults to ``Σ σᵢ²``.
    """
    energy = s.double().square().cumsum(0)
    denominator = float(energy[-1]) if total is None else total
    return energy / denominator if denominator > 0 else torch.ones_like(energy)


def rank_for_energy(s: torch.Tensor, fraction: float, total: float | None = None) -> int:
    """Smallest r whose top-r singular values keep at least ``fraction`` of the energy.

    When ``s`` is a truncated spectrum that cannot reach ``fraction`` of ``total``, returns
    ``len(s)`` (the caller asked for more than it computed).
    """
    if s.numel() == 0:
        return 0
    curve = energy_curve(s, total)
    reached = torch.nonzero(curve >= fraction - 1e-12)
    return int(reached[0]) + 1 if reached.numel() else int(s.numel())


def energy_kept(s: torch.Tensor, rank: int, total: float | None = None) -> float:
    """``Σ_{i≤rank} σᵢ² / ‖M‖²_F`` (at most 1), summed in float64.

    Args:
        s: singular values, descending.
        rank: how many of them are kept.
        total: ``‖M‖²_F`` when ``s`` is only the top of the spectrum; defaults to ``Σ σᵢ²``.

    Returns:
        The fraction of the energy kept; 1.0 for a zero matrix (nothing to lose).
    """
    energy = s.double().square()
    total = float(energy.sum()) if total is None else total
    return min(float(energy[:rank].sum()) / total, 1.0) if total > 0 else 1.0


def stable_rank(s: torch.Tensor, total: float | None = None) -> float:
    """``‖M‖²_F / ‖M‖²₂ = Σ σᵢ² / σ₁²``; between 1 and rank(M). 0 for a zero matrix."""
    top = float(s[0]) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    if total is None:  # normalise first: σ₁² itself may underflow
        return float((s.double() / top).square().sum())
    return total / top**2


def allocate_budget(
    spectra: Mapping[str, torch.Tensor],
    budget: int,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Split a total rank ``budget`` across modules to keep the most total energy.

    Each module first gets ``min_rank``; the rest of the budget goes to the largest remaining
    σᵢ² model-wide (the greedy choice is optimal because each module's σᵢ² are descending).

    Args:
        spectra: module → its singular values (descending).
        budget: total rank summed over modules.
        min_rank: rank every module keeps at least.
        max_rank: cap per module.

    Returns:
        module → rank, summing to at most ``budget``.
    """
    names = list(spectra)
    ranks = {name: min(min_rank, len(spectra[name])) for name in names}
    left = budget - sum(ranks.values())
    if left < 0:
        raise ValueError(f"a budget of {budget} cannot give {len(names)} modules rank {min_rank} each")
    candidates: list[tuple[float, str]] = []
    for name in names:
        cap = len(spectra[name]) if max_rank is None else min(max_rank, len(spectra[name]))
        tail = spectra[name][ranks[name] : cap].double().square().tolist()
        candidates += [(energy, name) for energy in tail]
    candidates.sort(key=lambda item: item[0], reverse=True)
    for _, name in candidates[:left]:
        ranks[name] += 1
    return ranks


# -- rank rules ---------------------------------------------------------------------------------------
RuleName = Literal["rank", "energy", "sv_threshold", "budget"]
RULES: tuple[RuleName, ...] = ("rank", "energy", "sv_threshold", "budget")
_FLAGS = {"rank": "-r/--rank", "energy": "--energy", "sv_threshold": "--sv-threshold", "budget": "--budget"}


@dataclass(frozen=True)
class RankRule:
    """How each module's rank r is chosen from its singular values σ (descending); one field set.

    - ``rank``: r = min(rank, len(σ)) for every module;
    - ``energy`` F in (0, 1]: the smallest r with ``Σ_{i≤r} σᵢ² ≥ F·‖ΔW‖²_F`` (Eckart–Young: the
      best rank-r approximation keeps exactly that energy);
    - ``sv_threshold`` t ≥ 0: every σᵢ ≥ t;
    - ``budget`` N: Σ r ≤ N over all modules, each at least ``min_rank``, the rest given to the
      largest σᵢ² model-wide (:func:`allocate_budget`).

    Each command says which rules it offers and whether one is required (:meth:`check`); the
    values are checked here, with the flag names the CLI uses, raising ``InvalidOptions``.
    """

    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None
    budget: int | None = None
    min_rank: int = 1

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InvalidOptions("; ".join(problems))

    def problems(self) -> list[str]:
        """Every out-of-range value, one message each (NaN is out of every range)."""
        checks = [
            (self.rank is None or self.rank >= 1, f"-r/--rank must be at least 1 (got {self.rank})"),
            (self.energy is None or 0 < self.energy <= 1, f"--energy must be in (0, 1], e.g. 0.9 (got {self.energy})"),
            (self.sv_threshold is None or self.sv_threshold >= 0, f"--sv-threshold must be ≥ 0 (got {self.sv_threshold})"),
            (self.budget is None or self.budget >= 1, f"--budget must be at least 1 (got {self.budget})"),
            (self.min_rank >= 1, f"--min-rank must be at least 1 (got {self.min_rank})"),
        ]  # fmt: skip
        return [message for ok, message in checks if not ok]

    @property
    def given(self) -> list[RuleName]:
        """The rules set, in :data:`RULES` order."""
        return [name for name in RULES if getattr(self, name) is not None]

    @property
    def name(self) -> RuleName | None:
        """The one rule set (None when none is)."""
        given = self.given
        return given[0] if len(given) == 1 else None

    def check(self, offered: Sequence[RuleName], *, required: bool = True) -> None:
        """Refuse anything but one rule out of ``offered`` (or none, when not ``required``).

        Raises:
            InvalidOptions: two rules, a rule the command does not offer, or none when required.
        """
        given = self.given
        if set(given) <= set(offered) and (len(given) == 1 or (not required and not given)):
            return
        flags = [_FLAGS[name] for name in offered]
        listed = ", ".join(flags[:-1]) + " or " + flags[-1] if len(flags) > 1 else flags[0]
        got = ", ".join(f"--{name.replace('_', '-')}" for name in given) or "none"
        if required:
            raise InvalidOptions(f"choose exactly one of {listed} (got {got})")
        raise InvalidOptions(f"give {listed}, not both (got {got})")

    def choose(self, s: torch.Tensor, total: float | None = None, *, at_least: int = 0) -> int:
        """One module's rank from its singular values ``s`` (descending).

        Args:
            s: singular values, descending (the top of the spectrum is enough for ``rank``,
                and for ``energy`` when ``total`` is given).
            total: ``‖ΔW‖²_F`` when ``s`` is only the top of the spectrum.
            at_least: the smallest rank to give (1 where a module cannot be dropped; with 0, a
                threshold above every σ drops the module).

        A budget is shared between modules (:meth:`ranks`); alone, it keeps all of ``s``.
        """
        if self.energy is not None:
            rank = rank_for_energy(s, self.energy, total)
        elif self.sv_threshold is not None:
            rank = int((s >= self.sv_threshold).sum())
        elif self.rank is not None:
            rank = min(self.rank, int(s.numel()))
        else:
            rank = int(s.numel())
        return max(at_least, rank)

    def ranks(self, spectra: Mapping[str, torch.Tensor], *, at_least: int = 0) -> dict[str, int]:
        """Every module's rank: the budget split (:func:`allocate_budget`), or :meth:`choose` each.

        Args:
            spectra: module → its singular values (descending, complete).
            at_least: the smallest rank :meth:`choose` may give (1 where a module cannot be dropped).

        Raises:
            LoratoolsError: a budget smaller than ``min_rank`` for every module.
        """
        if self.budget is None:
            return {name: self.choose(s, at_least=at_least) for name, s in spectra.items()}
        if self.budget < self.min_rank * len(spectra):
            raise LoratoolsError(
                f"a budget of {self.budget} cannot give {len(spectra)} modules rank "
                f"{self.min_rank} each; raise --budget or lower --min-rank"
            )
        return allocate_budget(spectra, self.budget, min_rank=self.min_rank)


def batched_randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    niter: int = 1,
    rtol: float = 1e-3,
    max_iter: int = 12,
    seed: int = 0,
    range_copy: torch.Tensor | None = None,
) -> list[Svd]:
    """Rank-``rank`` truncated SVDs of every matrix of a stack ``m`` (b, d, k), by a randomized
    range finder (Halko, Martinsson & Tropp 2011) run on all of them at once.

    1. Range finder, in :func:`range_dtype` (bfloat16 where that is faster): ``Q = qr(M Ω)`` with
       Ω (k, r + p) Gaussian, then subspace (power) iterations ``Q ← qr(M qr(Mᵀ Q))``. After
       ``niter`` iterations a matrix keeps iterating while one more iteration still lowers its
       rank-r residual ``‖M‖²_F − Σ_{i≤r} s̃ᵢ²`` by more than ``rtol`` of itself, so a slowly
       decaying spectrum gets the iterations it needs. ``Z = Mᵀ Q`` serves both as ``(Qᵀ M)ᵀ``,
       whose singular values give the residual, and as the first half of the next iteration.
    2. Where the range finder multiplied a rounded copy: half-steps on M itself in float32
       (:func:`_converge`) — at least one whole iteration, then until one more half-step lowers
       the residual by at most ``rtol / 2``. The bfloat16 rounding of M (≤ 2⁻⁹ relative) only
       tilts the subspace the range finder found; the float32 iteration shrinks that tilt by
       σ_{r+p+1}/σ_r and the projection is exact, so the result keeps float32 accuracy (the
       error bounds in tests/test_linalg.py hold for both paths). Where it ran in float32, the
       last ``Z`` is projected as it is. The residual is never below the optimum (s̃ᵢ ≤ σᵢ),
       and it converges to it.

    The experts of one projection share a shape, so they run as batched products
    ((b, d, k) @ (b, k, l)), QRs and small SVDs; every matrix is sketched with the same Ω that a
    one-matrix call draws for ``seed`` and leaves the batch at the iteration where it would stop
    alone, so each result is the one :func:`randomized_svd` gives, up to float rounding. Once
    some matrices have stopped, the others go on as a smaller stack. A sketch as wide as half
    the smaller side takes the exact batched SVD instead (it costs as much).

    Args:
        m: the stack (b, d, k); upcast to float32.
        rank, oversample, niter, rtol, max_iter, seed: as in :func:`randomized_svd`.
        range_copy: ``m`` rounded to the range finder's dtype, (b, d, k) (a caller's reused
            buffer); None: made here in :func:`range_dtype`; ``m`` itself: float32 throughout.

    Returns:
        b Svds, each u (d, rank), s (rank,), vh (rank, k).
    """
    m = _as_float(m)
    batch, d, k = m.shape
    width = min(rank + oversample, d, k)
    if width >= min(d, k) // 2:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (b, d, n), (b, n), (b, n, k)
        return [Svd(u[i, :, :rank], s[i, :rank], vh[i, :rank]) for i in range(batch)]
    if range_copy is None:  # float64 stays float64 throughout
        range_copy = m.to(range_dtype(m.device)) if m.dtype == torch.float32 else m
    work = m.dtype  # the dtype of everything but the range finder's products
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(k, width, generator=gen, device=m.device, dtype=work)  # (k, l), shared
    q = _orthonormal(_times(range_copy, omega, work))  # (b, d, l)
    z = _transposed_times(range_copy, q, work)  # (b, k, l) = (Qᵀ M)ᵀ
    # ‖M‖²_F of M itself for both: a rounded copy's own norm would upcast all of it (a copy), and
    # the rule compares residuals of one matrix, where a constant offset cancels
    total = squared_norms(m)  # (b,)
    residual = _residual(z, total, rank) if niter == 0 else torch.full_like(total, float("inf"))
    q, z = _iterate(
        range_copy, z, residual, total, first_check=max(niter, 1), rank=rank, rtol=rtol, max_iter=max_iter
    )
    if range_copy.dtype == work:
        u, s, vh = _project(z, q)  # (b, d, l), (b, l), (b, l, k)
    else:  # polish on M itself, from where the rounded copy's iterations stopped
        u, s, vh = _converge(m, z, total, rank=rank, rtol=rtol, max_iter=max_iter)
    return [Svd(u[i, :, :rank], s[i, :rank], vh[i, :rank]) for i in range(batch)]


def _times(m: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``M X`` in M's dtype, returned in ``dtype``: m (b, d, k), x (k, l) or (b, k, l)."""
    x = x.to(m.dtype)
    if m.shape[0] == 1:
        x_t = x.T if x.ndim == 2 else x[0].T  # (l, k)
        if m[0].is_contiguous():  # M as oneDNN's input: 15 % faster than as its weight
            fast = _onednn_linear(m[0], x_t)  # M (Xᵀ)ᵀ, (d, l)
        else:
            fast = _onednn_linear(x_t, m[0])
            fast = None if fast is None else fast.T  # (Xᵀ Mᵀ)ᵀ
        if fast is not None:
            return fast[None].to(dtype)
    return (m @ x).to(dtype)


def _transposed_times(m: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Mᵀ Q`` in M's dtype, returned in ``dtype``: m (b, d, k), q (b, d, l) → (b, k, l).

    Computed as ``(Qᵀ M)ᵀ``, which keeps M untransposed (bmm would copy a transposed M); a stack
    of one as a 2-D product.
    """
    q = q.to(m.dtype)
    if m.shape[0] == 1:
        fast = _onednn_linear(q[0].T, m[0].T)
        return (fast if fast is not None else q[0].T @ m[0]).T[None].to(dtype)
    return (q.mT @ m).mT.to(dtype)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``X Wᵀ`` (n, k) @ (m, k)ᵀ → (n, m) through oneDNN on the CPU, or None to use ``@``.

    torch sends float32 ``@`` to MKL, whose kernels for these skinny products (n = r + p ≤ a few
    dozen) reach half of an AVX-512 AMD CPU's peak; oneDNN's, which torch already uses for
    bfloat16, are 2–2.4× faster there (11008×4096 by 24 columns: 22 → 9 ms) — IEEE float32
    arithmetic both, in another summation order. Through torch's own (private) mkldnn linear
    op, so anything unexpected falls back to ``@`` for good.
    """
    if not _ONEDNN[0] or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:  # X is the matrix or a skinny one, contiguous either way (a transposed X is copied: slow)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
    except (AttributeError, RuntimeError):
        _ONEDNN[0] = False
        return None


_ONEDNN = [torch.backends.mkldnn.is_available()]  # cleared for good if the op is missing or refuses


def _residual(product: torch.Tensor, total: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r residual ``‖M‖²_F − Σ_{i≤r} s̃ᵢ²`` (b,) float64 of a projection of M, from its
    product with the projection's orthonormal basis (``Mᵀ Q`` or ``M P``, (b, ·, l)): s̃ are its
    singular values."""
    s = torch.linalg.svdvals(product)  # (b, l), descending
    return (total - s[:, :rank].double().square().sum(dim=1)).clamp(min=0.0)


def _stopped(
    residual: torch.Tensor, new_residual: torch.Tensor, total: torch.Tensor, rtol: float
) -> torch.Tensor:
    """(b,) bool: the last step lowered the residual by at most ``rtol`` of itself (or it is ~0)."""
    return (residual - new_residual <= rtol * new_residual) | (new_residual <= 1e-12 * total)


def _iterate(
    m: torch.Tensor,
    z: torch.Tensor,
    residual: torch.Tensor,
    total: torch.Tensor,
    *,
    first_check: int,
    rank: int,
    rtol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace iterations ``Q ← qr(M qr(Z))``, ``Z ← Mᵀ Q`` on the stack m (b, d, k), each matrix
    until one more iteration lowers its rank-r residual by at most ``rtol`` of itself.

    Args:
        m: the stack the products are taken with (b, d, k): M, or its rounded copy.
        z: ``Mᵀ Q`` of the subspace to start from, (b, k, l), in the results' dtype.
        residual: the residual of that subspace (b,) float64; inf when it is not to be compared.
        total: ``‖M‖²_F`` (b,) float64.
        first_check: iterations always done before the residual is compared.
        rank, rtol, max_iter: as in :func:`batched_randomized_svd` (``max_iter`` caps the iterations).

    Returns:
        The last Q (b, d, l) and Z (b, k, l) of every matrix, in ``m``'s order. A matrix that stops
        leaves the stack; the others go on as a smaller one.
    """
    work = z.dtype
    out_q = torch.empty(m.shape[0], m.shape[1], z.shape[2], dtype=work, device=z.device)
    out_z = torch.empty_like(z)
    active, iteration = torch.arange(m.shape[0]), 0  # the matrices still iterating, as rows of the input
    while True:
        q = _orthonormal(_times(m, _orthonormal(z), work))  # one subspace iteration, (b, d, l)
        z = _transposed_times(m, q, work)  # (b, k, l) = (Qᵀ M)ᵀ
        iteration += 1
        if iteration < first_check:
            continue
        new_residual = _residual(_as_multiplied(z, q, m.dtype), total, rank)
        done = _stopped(residual, new_residual, total, rtol)
        if iteration >= max_iter:
            done[:] = True
        if bool(done.any()):
            rows = active[done]
            out_q[rows], out_z[rows] = q[done], z[done]
            if bool(done.all()):
                return out_q, out_z
            keep = ~done
            active, m, z, total, new_residual = (
                active[keep],
                m[keep],
                z[keep],
                total[keep],
                new_residual[keep],
            )
        residual = new_residual


def _as_multiplied(z: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Mᵀ Q'`` for the orthonormal basis Q' of the ``q`` that the product ``z`` really multiplied.

    A product in bfloat16 multiplies q rounded to bfloat16, whose columns are orthonormal only to
    2⁻⁹; its singular values would misstate the residual by about 2⁻⁹/√d of ‖M‖² — more than the
    residual itself when M is nearly low-rank. With ``q̃ = Q' R'``: ``Mᵀ Q' = Z R'⁻¹``.
    """
    if q.dtype == dtype:
        return z
    r = torch.linalg.qr(q.to(dtype).to(q.dtype)).R  # (b, l, l), ≈ I
    return torch.linalg.solve_triangular(r, z, upper=True, left=False)


def _converge(
    m: torch.Tensor, z: torch.Tensor, total: torch.Tensor, *, rank: int, rtol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-steps of subspace iteration on the stack m (b, d, k) from a subspace found on a
    rounded copy of it (``z = M̃ᵀ Q``, (b, k, l)), each matrix until one more half-step lowers its
    rank-r residual by at most ``rtol / 2`` of itself.

    The half-steps alternate sides: with ``P = qr(Z)``, ``Y = M P`` projects from the right
    (M ≈ Y Pᵀ), then with ``Q = qr(Y)``, ``Z = Mᵀ Q`` projects from the left (M ≈ Q Zᵀ), and so on.
    Each product is one pass over M and gives an estimate whose residual can only be lower than
    the one before (the new basis spans M or Mᵀ applied to the old one), so consecutive
    estimates are compared without an extra pass. At least two products (one whole float32
    iteration, which removes what is left of the rounding's tilt); two half-steps make one
    subspace iteration, hence ``rtol / 2``.

    Returns:
        The SVDs of the last projections: u (b, d, l), s (b, l), vh (b, l, k).
    """
    batch, d, k = m.shape
    width, work = z.shape[2], z.dtype
    u = torch.empty(batch, d, width, dtype=work, device=m.device)
    s = torch.empty(batch, width, dtype=work, device=m.device)
    vh = torch.empty(batch, width, k, dtype=work, device=m.device)
    active = torch.arange(batch)  # the matrices still iterating, as rows of the input
    product, residual = z, torch.full_like(total, float("inf"))
    for step in range(1, 2 * max_iter + 1):
        left = step % 2 == 0  # odd steps: M P from the right; even steps: Mᵀ Q from the left
        basis = _orthonormal(product)
        product = _transposed_times(m, basis, work) if left else _times(m, basis, work)
        new_residual = _residual(product, total, rank)
        # never on the first product: from the right alone, a tilt of the rounded copy's subspace
        # below float32's resolution of the residual (~1e-7·‖M‖²) would stay in the result
        done = _stopped(residual, new_residual, total, rtol / 2) & (step > 1)
        if step == 2 * max_iter:
            done[:] = True
        if bool(done.any()):
            rows = active[done]
            if left:  # M ≈ Q Zᵀ
                u[rows], s[rows], vh[rows] = _project(product[done], basis[done])
            else:  # Mᵀ ≈ P Yᵀ: the SVD of Mᵀ, transposed
                u_t, s[rows], vh_t = _project(product[done], basis[done])
                u[rows], vh[rows] = vh_t.mT, u_t.mT
            if bool(done.all()):
                break
            keep = ~done
            active, m, product = active[keep], m[keep], product[keep]
            total, new_residual = total[keep], new_residual[keep]
        residual = new_residual
    return u, s, vh
