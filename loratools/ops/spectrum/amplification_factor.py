"""The amplification factor of an update Δ on its base weight W0 (Hu et al., 2021, Section 7.3).

``‖Δ‖_F / ‖Uᵀ W0 V‖_F`` with U, V the top-r singular vectors of Δ: large when Δ boosts directions
that W0 barely uses. The paper's baseline repeats it for random orthonormal U, V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratools import linalg

__all__ = ["Amplification", "amplification"]


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
