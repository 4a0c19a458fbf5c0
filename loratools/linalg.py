"""Pure linear algebra on tensors: truncated SVDs, factored SVDs of low-rank products, energy.

Everything here takes tensors and returns tensors (float32 unless stated), never touches files and
never forms a dense d×k matrix where a factored form works:

- :func:`randomized_svd` — Halko, Martinsson & Tropp (2011): a Gaussian sketch, power iterations
  with QR re-orthonormalisation, and a small SVD. O(d·k·(r+p)) per iteration instead of
  O(d·k·min(d, k)) for a full SVD. Iterates until the rank-r error stops improving.
- :func:`factored_svd` — the SVD of ``B @ A`` (B: d×r, A: r×k) from QR(B), QR(Aᵀ) and the SVD of
  an r×r core: O((d + k)·r²).
- energy helpers: ``‖M‖²_F = Σ σᵢ²``; the best rank-r error is ``Σ_{i>r} σᵢ²`` (Eckart–Young).
- :func:`lora_from_svd` — the LoRA module of a truncated SVD (the one place factors are cut).
- :class:`RankRule` — how each module's rank is chosen from its singular values (a fixed rank,
  an energy fraction, a singular-value threshold, or a rank budget over all modules), validated
  once for extract, resize, combine and convert.
"""

from __future__ import annotations

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
    "lora_from_svd",
    "randomized_svd",
    "rank_for_energy",
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


def _project(z: torch.Tensor, q: torch.Tensor) -> Svd:
    """SVD of M restricted to the column space of ``q``, from ``z = Mᵀ Q``: M ≈ Q (Qᵀ M) = Q zᵀ."""
    u_small, s, vh = torch.linalg.svd(z.T, full_matrices=False)  # (l, l), (l,), (l, k)
    return Svd(q @ u_small, s, vh)


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    niter: int = 1,
    rtol: float = 1e-3,
    max_iter: int = 12,
    seed: int = 0,
) -> Svd:
    """Rank-``rank`` truncated SVD of ``m`` (d, k) by a randomized range finder.

    Sketch ``Q = qr(M Ω)`` with Ω (k, r + p) Gaussian, then subspace (power) iterations
    ``Q ← qr(M qr(Mᵀ Q))``. After ``niter`` iterations it keeps iterating while one more
    iteration still lowers the rank-r residual ``‖M‖²_F − Σ_{i≤r} s̃ᵢ²`` by more than ``rtol``
    of itself, so a slowly decaying spectrum gets the iterations it needs instead of a worse
    factorisation. The residual is never below the optimum (s̃ᵢ ≤ σᵢ), and it converges to it.

    Each iteration costs two products with M: ``Z = Mᵀ Q`` (k, l) serves both as ``(Qᵀ M)ᵀ``,
    whose small SVD gives the current estimate and its residual, and as the first half of the
    next iteration — the convergence check costs no extra pass over M.

    Args:
        m: the matrix, (d, k); upcast to float32.
        rank: how many singular triplets to return.
        oversample: extra sketch columns p (Halko et al. suggest 5–10).
        niter: power iterations always done before the residual is checked.
        rtol: stop when one iteration improves the squared residual by less than this fraction.
        max_iter: hard cap on power iterations.
        seed: seed of the Gaussian sketch (results are deterministic for a given seed/device).

    Returns:
        Svd with u (d, rank), s (rank,), vh (rank, k).

    Example:
        >>> svd = randomized_svd(torch.randn(512, 256), 8)
        >>> b, a = svd.factors()  # (512, 8), (8, 256)
    """
    m = _as_float(m)
    d, k = m.shape
    width = min(rank + oversample, d, k)
    if width >= min(d, k) // 2:  # a sketch this wide costs as much as the exact SVD
        return exact_svd(m).truncate(rank)
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(k, width, generator=gen, device=m.device, dtype=m.dtype)  # (k, l)
    q = _orthonormal(m @ omega)  # (d, l)
    total = float(torch.linalg.vector_norm(m)) ** 2  # ‖M‖²_F without a d×k temporary
    residual, iteration = float("inf"), 0
    while True:
        z = m.T @ q  # (k, l) = (Qᵀ M)ᵀ
        if iteration >= niter:
            svd = _project(z, q)
            new_residual = max(total - float(svd.s[:rank].square().sum()), 0.0)
            done = residual - new_residual <= rtol * new_residual or new_residual <= 1e-12 * total
            if done or iteration >= max_iter:
                return svd.truncate(rank)
            residual = new_residual
        q = _orthonormal(m @ _orthonormal(z))  # one subspace iteration, (d, l)
        iteration += 1


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
) -> list[Svd]:
    """:func:`randomized_svd` of every matrix of a stack ``m`` (b, d, k) at once.

    The experts of one projection share a shape, so their range finders run as batched products
    ((b, d, k) @ (b, k, l)) and batched QR and small SVDs instead of b separate calls. Every
    matrix is sketched with the Gaussian Ω (k, l) that :func:`randomized_svd` draws for ``seed``
    and leaves the batch at the iteration where a separate call would stop (its own stopping
    rule), so each result is the one a separate call gives, up to float rounding. Once some
    matrices have stopped, the others go on as a smaller stack (one gather each time it shrinks).
    A sketch as wide as half the smaller side takes the exact batched SVD instead.

    Args:
        m: the stack (b, d, k); upcast to float32.
        rank, oversample, niter, rtol, max_iter, seed: as in :func:`randomized_svd`.

    Returns:
        b Svds, each u (d, rank), s (rank,), vh (rank, k).
    """
    m = _as_float(m)
    batch, d, k = m.shape
    width = min(rank + oversample, d, k)
    if width >= min(d, k) // 2:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (b, d, n), (b, n), (b, n, k)
        return [Svd(u[i, :, :rank], s[i, :rank], vh[i, :rank]) for i in range(batch)]
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(k, width, generator=gen, device=m.device, dtype=m.dtype)  # (k, l), shared
    results: list[Svd | None] = [None] * batch
    active = torch.arange(batch)  # the matrices still iterating, as rows of m
    q = _orthonormal(m @ omega)  # (b, d, l)
    # ‖M‖²_F as a separate call computes it (a float32 norm, squared in float64)
    total = torch.linalg.vector_norm(m, dim=(1, 2)).double().square()  # (b,)
    residual, iteration = torch.full_like(total, float("inf")), 0
    while True:
        z = (q.mT @ m).mT  # (b, k, l) = (Qᵀ M)ᵀ; Qᵀ M keeps M untransposed (bmm would copy a transposed M)
        if iteration >= niter:
            u_small, s, vh = torch.linalg.svd(z.mT, full_matrices=False)  # (b, l, l), (b, l), (b, l, k)
            new_residual = (total - s[:, :rank].double().square().sum(dim=1)).clamp(min=0.0)
            done = (residual - new_residual <= rtol * new_residual) | (new_residual <= 1e-12 * total)
            if iteration >= max_iter:
                done[:] = True
            if bool(done.any()):
                u = q[done] @ u_small[done]  # (n, d, l)
                for row, i in enumerate(active[done].tolist()):
                    results[i] = Svd(u[row, :, :rank], s[done][row, :rank], vh[done][row, :rank])
                if bool(done.all()):
                    return [r for r in results if r is not None]
                keep = ~done
                active, m, q, z = active[keep], m[keep], q[keep], z[keep]
                total, new_residual = total[keep], new_residual[keep]
            residual = new_residual
        q = _orthonormal(m @ _orthonormal(z))  # one subspace iteration, (b, d, l)
        iteration += 1
