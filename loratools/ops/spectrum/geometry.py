"""What fine-tuning did to a weight matrix, beyond the rank of ΔW: magnitude and direction,
spectral shift and rotation, and intruder dimensions.

Every measure compares one base matrix W0 (out × in) with its fine-tuned counterpart W′ (a full
fine-tune's W_ft, or W0 + s·B·A for an adapter), both in float32:

- Magnitude and direction (Liu et al. 2024, DoRA, arXiv 2402.09353, §2): per output feature n
  (row n), ``ΔM = meanₙ |‖W′ⁿ‖ − ‖W0ⁿ‖|`` and ``ΔD = meanₙ (1 − cos(W′ⁿ, W0ⁿ))``. The paper finds a
  negative correlation of ΔD and ΔM across layers for full fine-tuning, a positive one for LoRA.
  Cost O(out·in).
- Spectral shift and rotation (arXiv 2505.23099): with σᵢ, uᵢ and σ′ᵢ, u′ᵢ the top-k singular
  values and left singular vectors of W0 and W′, ``Δσᵢ = σ′ᵢ − σᵢ`` and the alignment
  ``|⟨u′ᵢ, uᵢ⟩|`` — near 1 when fine-tuning rescaled an existing direction, near 0 when it
  rotated it away. Two rank-k randomized SVDs, O(out·in·k).
- Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228, as PEFT implements them):
  for each of the top-k left singular vectors u′ⱼ of W′, ``sⱼ = maxᵢ |⟨u′ⱼ, uᵢ⟩|`` over *all* left
  singular vectors uᵢ of W0; u′ⱼ is an intruder when ``sⱼ < ε`` — a direction that is new, not a
  rotated pre-trained one. This needs W0's complete left singular basis: a full SVD,
  O(out·in·min(out, in)) per module (seconds for a 4096² matrix on a GPU, tens of seconds on
  a CPU), which is why it is opt-in.

Singular vectors are defined up to sign (every measure takes absolute values) and, for equal
singular values, up to rotation inside their subspace; alignments of near-degenerate pairs are
not meaningful, and the report keeps the singular values so a reader can see such ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loratools import linalg
from loratools.errors import LoratoolsError

__all__ = [
    "GeometryOptions",
    "Intruders",
    "MagnitudeDirection",
    "ModuleGeometry",
    "Rotation",
    "direction_magnitude_correlation",
    "intruders",
    "magnitude_direction",
    "module_geometry",
    "rotation",
]

ROTATION_POWER_ITERATIONS = 8  # singular *vectors* converge more slowly than values (Halko et al. §10)


@dataclass(frozen=True)
class GeometryOptions:
    """Which geometric measures to compute, and their parameters.

    Attributes:
        geometry: magnitude/direction and spectral shift/rotation (cheap).
        intruders: intruder dimensions (a full SVD of each base matrix).
        k: how many top singular directions rotation and intruders look at (PEFT: 10).
        epsilon: a direction is an intruder when its best similarity is below this (PEFT: 0.5).
        seed: seed of the randomized SVDs.
    """

    geometry: bool = False
    intruders: bool = False
    k: int = 10
    epsilon: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise LoratoolsError(f"--intruder-k {self.k}: must be at least 1")
        if not 0.0 < self.epsilon <= 1.0:
            raise LoratoolsError(f"--intruder-epsilon {self.epsilon}: must be in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.geometry or self.intruders

    def settings(self) -> dict[str, Any]:
        """What a report records of these options (nothing when no measure was asked for)."""
        if not self.enabled:
            return {}
        return {
            "geometry": self.geometry,
            "intruders": self.intruders,
            "intruder_k": self.k,
            "intruder_epsilon": self.epsilon,
        }


@dataclass(frozen=True)
class MagnitudeDirection:
    """DoRA's decomposition of an update: mean magnitude change ΔM, mean direction change ΔD."""

    delta_m: float
    delta_d: float

    def to_dict(self) -> dict[str, Any]:
        return {"delta_m": self.delta_m, "delta_d": self.delta_d}


@dataclass(frozen=True)
class Rotation:
    """Top-k spectral shift ``σ′ᵢ − σᵢ`` and alignment ``|⟨u′ᵢ, uᵢ⟩|`` of W′ against W0."""

    k: int
    sigma_base: list[float]
    sigma_finetuned: list[float]
    alignment: list[float]

    @property
    def sigma_change(self) -> list[float]:
        return [f - b for f, b in zip(self.sigma_finetuned, self.sigma_base, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "sigma_change": self.sigma_change,
            "alignment": self.alignment,
            "sigma_base": self.sigma_base,
            "sigma_finetuned": self.sigma_finetuned,
        }


@dataclass(frozen=True)
class Intruders:
    """Intruder dimensions among W′'s top-k left singular vectors.

    Attributes:
        k: how many top directions were examined.
        epsilon: the similarity threshold.
        similarities: ``sⱼ = maxᵢ |⟨u′ⱼ, uᵢ⟩|`` for j = 1…k (fewer when min(out, in) < k).
        singular_values: σ′ⱼ of W′ for the same j.
    """

    k: int
    epsilon: float
    similarities: list[float]
    singular_values: list[float]

    @property
    def ranks(self) -> list[int]:
        """1-based positions j of the intruders in W′'s spectrum."""
        return [j + 1 for j, s in enumerate(self.similarities) if s < self.epsilon]

    @property
    def count(self) -> int:
        return len(self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "epsilon": self.epsilon,
            "similarities": self.similarities,
            "count": self.count,
            "ranks": self.ranks,
            "singular_values": [self.singular_values[j - 1] for j in self.ranks],
        }


@dataclass(frozen=True)
class ModuleGeometry:
    """The measures computed for one module (each None when not asked for)."""

    magnitude_direction: MagnitudeDirection | None = None
    rotation: Rotation | None = None
    intruders: Intruders | None = None

    def to_dict(self) -> dict[str, Any]:
        """The keys scripts rely on: ``magnitude_direction``, ``rotation``, ``intruders``."""
        parts = {
            "magnitude_direction": self.magnitude_direction,
            "rotation": self.rotation,
            "intruders": self.intruders,
        }
        return {key: part.to_dict() for key, part in parts.items() if part is not None}


def _pair(w0: torch.Tensor, w_ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if w0.shape != w_ft.shape or w0.ndim != 2:
        raise LoratoolsError(
            f"geometry needs two matrices of one shape, got {tuple(w0.shape)}, {tuple(w_ft.shape)}"
        )
    return w0.float(), w_ft.float()


def magnitude_direction(w0: torch.Tensor, w_ft: torch.Tensor) -> MagnitudeDirection:
    """``ΔM = meanₙ |‖W′ⁿ‖ − ‖W0ⁿ‖|``, ``ΔD = meanₙ (1 − cos(W′ⁿ, W0ⁿ))`` over rows n of (out, in).

    A row that is zero in W0 or W′ has no direction; it counts as cos = 1 (no direction change)
    rather than NaN.
    """
    w0, w_ft = _pair(w0, w_ft)
    norm0 = torch.linalg.vector_norm(w0, dim=1)  # (out,)
    norm_ft = torch.linalg.vector_norm(w_ft, dim=1)
    dots = (w0 * w_ft).sum(dim=1)  # (out,)
    denominator = norm0 * norm_ft
    cos = torch.where(denominator > 0, dots / denominator.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    return MagnitudeDirection(
        delta_m=float((norm_ft - norm0).abs().mean()),
        delta_d=float((1.0 - cos.clamp(-1.0, 1.0)).mean()),
    )


def _top_svd(m: torch.Tensor, k: int, seed: int) -> linalg.Svd:
    """Top-k singular triplets by a randomized SVD with extra power iterations (vectors, not only
    values, must converge): the i-th vector is off by about (σ_{k+9}/σᵢ)^17."""
    return linalg.randomized_svd(m, k, niter=ROTATION_POWER_ITERATIONS, rtol=1e-6, seed=seed)


def _rotation(base: linalg.Svd, tuned: linalg.Svd) -> Rotation:
    alignment = (base.u * tuned.u).sum(dim=0).abs()  # (k,): column-wise ⟨u′ᵢ, uᵢ⟩
    return Rotation(tuned.rank, base.s.tolist(), tuned.s.tolist(), alignment.clamp(max=1.0).tolist())


def _intruders(u0: torch.Tensor, tuned: linalg.Svd, k: int, epsilon: float) -> Intruders:
    similarity = (u0.T @ tuned.u).abs().amax(dim=0)  # U0ᵀ U′: (min(out, in), k) → (k,)
    return Intruders(k, epsilon, similarity.clamp(max=1.0).tolist(), tuned.s.tolist())


def _base_basis(w0: torch.Tensor) -> linalg.Svd:
    """W0's thin SVD: all min(out, in) left singular vectors, the basis intruders are measured in."""
    return linalg.exact_svd(w0)


def rotation(w0: torch.Tensor, w_ft: torch.Tensor, k: int = 10, seed: int = 0) -> Rotation:
    """Top-k ``σ′ᵢ − σᵢ`` and ``|⟨u′ᵢ, uᵢ⟩|`` by randomized SVDs of W0 and W′ (k ≤ min(out, in))."""
    w0, w_ft = _pair(w0, w_ft)
    k = min(k, *w0.shape)
    return _rotation(_top_svd(w0, k, seed), _top_svd(w_ft, k, seed))


def intruders(
    w0: torch.Tensor, w_ft: torch.Tensor, k: int = 10, epsilon: float = 0.5, seed: int = 0
) -> Intruders:
    """``sⱼ = maxᵢ |⟨u′ⱼ, uᵢ⟩|`` for W′'s top-k left singular vectors against all of W0's.

    W0's thin SVD gives its min(out, in) left singular vectors (the full basis of its column
    space; the one full SVD this costs); W′'s top k come from a randomized SVD. Shapes: U0
    (out, min), U′ (out, k), U0ᵀ U′ (min, k).
    """
    w0, w_ft = _pair(w0, w_ft)
    return _intruders(_base_basis(w0).u, _top_svd(w_ft, min(k, *w0.shape), seed), k, epsilon)


def module_geometry(w0: torch.Tensor, w_ft: torch.Tensor, options: GeometryOptions) -> ModuleGeometry:
    """The measures ``options`` asks for, for one pair W0, W′ (out, in), sharing the SVDs: W′'s
    top k serve rotation and intruders, and with intruders W0's full SVD also gives its top k."""
    w0, w_ft = _pair(w0, w_ft)
    k = min(options.k, *w0.shape)
    tuned = _top_svd(w_ft, k, options.seed)
    basis = _base_basis(w0) if options.intruders else None
    geometry = None
    if options.geometry:
        base_top = basis.truncate(k) if basis is not None else _top_svd(w0, k, options.seed)
        geometry = (magnitude_direction(w0, w_ft), _rotation(base_top, tuned))
    return ModuleGeometry(
        magnitude_direction=geometry[0] if geometry else None,
        rotation=geometry[1] if geometry else None,
        intruders=_intruders(basis.u, tuned, options.k, options.epsilon) if basis is not None else None,
    )


def direction_magnitude_correlation(points: list[MagnitudeDirection]) -> float | None:
    """Pearson correlation of ΔD with ΔM over modules (DoRA paper, Figure 2); None below 3 points
    or when either is constant."""
    if len(points) < 3:
        return None
    values = torch.tensor([[p.delta_m, p.delta_d] for p in points], dtype=torch.float64)
    centred = values - values.mean(dim=0)
    scale = torch.linalg.vector_norm(centred, dim=0)
    if float(scale.min()) == 0.0:
        return None
    return float((centred[:, 0] * centred[:, 1]).sum() / (scale[0] * scale[1]))
