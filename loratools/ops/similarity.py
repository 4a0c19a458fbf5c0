"""Subspace similarity between two adapters (Hu et al., 2021, Section 7.2, Figure 3).

For one module of two adapters, let U₁ (n, r₁) and U₂ (n, r₂) be orthonormal singular vectors,
ordered by singular value: the right singular vectors of A (n = in_features; the paper's choice)
or, with ``side="left"``, the left singular vectors of B (n = out_features). Then::

    φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j)      i ≤ r₁, j ≤ r₂

is the normalised overlap of the top-i directions of one with the top-j of the other: 1 when one
subspace contains the other, 0 when they are orthogonal. With ``G = U₁ᵀ U₂`` (r₁, r₂) every
φ(i, j) is a 2-D prefix sum of G², so the whole matrix costs one (r₁ × n)·(n × r₂) product.
The singular values of G are the cosines of the principal angles between the two subspaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loratools.adapter import Adapter, LoraWeight, ModuleWeight
from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch, list_problems
from loratools.formats.detect import is_kohya_stem
from loratools.progress import Progress, no_progress

__all__ = [
    "ModuleSimilarity",
    "SimilarityOptions",
    "SimilarityReport",
    "adapter_similarity",
    "phi_matrix",
    "principal_cosines",
    "singular_basis",
]

Side = Literal["right", "left"]


@dataclass(frozen=True)
class SimilarityOptions:
    """How φ is measured.

    Attributes:
        side: ``"right"``: right singular vectors of A (the paper); ``"left"``: left singular
            vectors of B.
        threshold: a direction counts as shared when its squared principal cosine (or φ(i, i))
            exceeds this; the paper reads off φ > 0.5.
    """

    side: Side = "right"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise LoratoolsError(f"--side {self.side!r}: use 'right' (A) or 'left' (B)")
        if not 0.0 <= self.threshold <= 1.0:
            raise LoratoolsError(f"--threshold {self.threshold}: must lie in [0, 1]")


def singular_basis(weight: ModuleWeight, side: Side = "right") -> torch.Tensor:
    """Orthonormal singular vectors of A (right) or B (left), by descending singular value.

    Returns:
        (in_features, r') for ``"right"``, (out_features, r') for ``"left"``; r' = min(r, n),
        float64 (these matrices are small and float64 keeps φ(A, A, i, i) = 1 to 1e-12).
    """
    if not isinstance(weight, LoraWeight):  # LoHa, LoKr: ΔW's own singular vectors, from L @ R
        from loratools.linalg import factored_svd

        svd = factored_svd(*(t.double() for t in weight.scaled_factors()))
        kept = svd.s > (svd.s[0] * 1e-10 if svd.s.numel() else 0.0)  # its rank, not the width of L @ R
        return svd.vh[kept].T if side == "right" else svd.u[:, kept]
    if side == "right":
        return torch.linalg.svd(weight.a.double(), full_matrices=False).Vh.T  # (in, r')
    return torch.linalg.svd(weight.b.double(), full_matrices=False).U  # (out, r')


def phi_matrix(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖u1[:, :i]ᵀ u2[:, :j]‖²_F / min(i, j) for all i ≤ r₁, j ≤ r₂.

    Args:
        u1: (n, r₁) with orthonormal columns.
        u2: (n, r₂) with orthonormal columns.

    Returns:
        (r₁, r₂); entry [i-1, j-1] is φ(i, j), in [0, 1].
    """
    g2 = (u1.T @ u2).square()  # (r₁, r₂): squared cosines between single directions
    prefix = g2.cumsum(0).cumsum(1)  # prefix[i-1, j-1] = ‖u1[:, :i]ᵀ u2[:, :j]‖²_F
    i = torch.arange(1, u1.shape[1] + 1, dtype=g2.dtype)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=g2.dtype)[None, :]
    # ‖PᵀQ‖²_F ≤ min(i, j) holds exactly; the clamp only removes float rounding past 1
    return (prefix / torch.minimum(i, j)).clamp(0.0, 1.0)


def principal_cosines(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u1) and span(u2), descending; min(r₁, r₂) of them."""
    return torch.linalg.svdvals(u1.T @ u2).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ModuleSimilarity:
    """φ for one module shared by both adapters.

    Attributes:
        name: module path.
        phi: (r₁, r₂) float64, φ(i, j) at [i-1, j-1].
        cosines: principal cosines between the two whole subspaces, descending.
        dimension: n, the dimension of the space the directions live in (in or out features).
    """

    name: str
    phi: torch.Tensor
    cosines: torch.Tensor
    dimension: int

    def random_phi(self, i: int, j: int) -> float:
        """E[φ(i, j)] for uniformly random subspaces: ``i·j/n / min(i, j) = max(i, j) / n``.

        The baseline to read φ against: in a small space even unrelated subspaces overlap.
        """
        return min(1.0, max(i, j) / self.dimension)

    @property
    def diagonal(self) -> list[float]:
        """φ(i, i) for i = 1 … min(r₁, r₂)."""
        return torch.diagonal(self.phi).tolist()

    def shared_directions(self, threshold: float = 0.5) -> int:
        """How many principal directions the subspaces share with cos² θ > ``threshold``."""
        return int((self.cosines.square() > threshold).sum())

    def diagonal_above(self, threshold: float = 0.5) -> int:
        """How many i have φ(i, i) > ``threshold``."""
        return int((torch.diagonal(self.phi) > threshold).sum())

    def to_dict(self, threshold: float = 0.5) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranks": list(self.phi.shape),
            "phi": self.phi.tolist(),
            "diagonal": self.diagonal,
            "principal_cosines": self.cosines.tolist(),
            "shared_directions": self.shared_directions(threshold),
            "diagonal_above_threshold": self.diagonal_above(threshold),
            "dimension": self.dimension,
            "random_phi": self.random_phi(*self.phi.shape),
        }


@dataclass(frozen=True)
class SimilarityReport:
    """φ per shared module, plus the modules only one adapter has."""

    modules: list[ModuleSimilarity]
    options: SimilarityOptions
    only_in_first: list[str] = field(default_factory=list)
    only_in_second: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean φ(i, i) and shared directions per module type and for the whole adapter."""
        groups: dict[str, list[ModuleSimilarity]] = {}
        for m in self.modules:
            groups.setdefault(m.name.rsplit(".", 1)[-1], []).append(m)
        return {
            "by_type": {k: _group(v, self.options.threshold) for k, v in groups.items()},
            "model": _group(self.modules, self.options.threshold),
        }

    def to_dict(self) -> dict[str, Any]:
        t = self.options.threshold
        return {
            "side": self.options.side,
            "threshold": t,
            "modules": [m.to_dict(t) for m in self.modules],
            "summary": self.summary(),
            "only_in_first": self.only_in_first,
            "only_in_second": self.only_in_second,
        }


def _group(modules: Sequence[ModuleSimilarity], threshold: float) -> dict[str, Any]:
    """Mean diagonal φ(i, i) over modules (up to the shortest diagonal) and mean shared directions."""
    if not modules:
        return {"modules": 0}
    length = min(min(m.phi.shape) for m in modules)
    diagonal = torch.stack([torch.diagonal(m.phi)[:length] for m in modules]).mean(0)
    shared = [m.shared_directions(threshold) for m in modules]
    return {
        "modules": len(modules),
        "mean_diagonal": diagonal.tolist(),
        "shared_directions_mean": sum(shared) / len(shared),
        "shared_directions_min": min(shared),
    }


def adapter_similarity(
    first: Adapter,
    second: Adapter,
    options: SimilarityOptions | None = None,
    *,
    progress: Progress = no_progress,
) -> SimilarityReport:
    """φ(i, j) between two adapters, for every module both adapt. Ranks may differ (r = 8 vs 64).

    Args:
        first: ADAPTER_1 (rows i of φ).
        second: ADAPTER_2 (columns j of φ).
        options: side and threshold.
        progress: called once per shared module.

    Raises:
        MissingKeys: the adapters share no module.
        ShapeMismatch: a shared module whose A (or B) dimension differs between the two.
    """
    options = options or SimilarityOptions()
    shared = [name for name in first.weights if name in second.weights]
    if not shared:
        raise MissingKeys(
            f"the two adapters adapt no module in common (first: {list_problems(first.modules, 3)}; "
            f"second: {list_problems(second.modules, 3)}); {_no_common_hint(first, second)}"
        )
    _check_shapes(first, second, shared, options.side)
    modules = []
    for name in shared:
        u1 = singular_basis(first.weights[name], options.side)
        u2 = singular_basis(second.weights[name], options.side)
        modules.append(ModuleSimilarity(name, phi_matrix(u1, u2), principal_cosines(u1, u2), u1.shape[0]))
        progress(name)
    only_first = [n for n in first.weights if n not in second.weights]
    only_second = [n for n in second.weights if n not in first.weights]
    return SimilarityReport(modules, options, only_first, only_second)


def _no_common_hint(first: Adapter, second: Adapter) -> str:
    """Kohya names on one side only (a kohya file read without a base) are the usual reason."""
    stems = [all(is_kohya_stem(m) for m in a.weights) for a in (first, second)]
    if stems[0] != stems[1]:
        return "one has kohya names, the other module paths: pass --base BASE to resolve the kohya names"
    return "were they made for the same model?"


def _check_shapes(first: Adapter, second: Adapter, names: Sequence[str], side: Side) -> None:
    axis = 1 if side == "right" else 0  # shape is (out, in): A spans in_features, B out_features
    problems = []
    for name in names:
        n1, n2 = first.weights[name].shape[axis], second.weights[name].shape[axis]
        if n1 != n2:
            problems.append(f"{name}: {n1} vs {n2}")
    if problems:
        what = "in_features" if side == "right" else "out_features"
        raise ShapeMismatch(f"modules with different {what}: {list_problems(problems)}; same base model?")
