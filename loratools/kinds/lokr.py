"""LoKr (Kronecker-product adapters, LyCORIS; Yeh et al., 2024, https://arxiv.org/abs/2309.14859)::

    ΔW = s · (W1 ⊗ W2),   W1: (a, c),  W2: (b, d·kh·kw),  out = a·b,  in·kh·kw = c·d·kh·kw

Each factor is stored full (``lokr_w1``, ``lokr_w2``) or low-rank (``lokr_w1_a`` (a, r) @
``lokr_w1_b`` (r, c), ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·kh·kw)); a conv W2 may be a Tucker
product ``lokr_t2`` (r, r, kh, kw) with ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d)::

    W2[p, (e, k)] = Σ_ij t2[i, j, k] · w2_a[i, p] · w2_b[j, e]

A conv ΔW is the 2-D matrix reshaped to (out, in, kh, kw): ``torch.kron`` of W1 (a, c, 1, 1) with
W2 (b, d, kh, kw) puts column (c_i·d + d_i, k) at c_i·d·K + d_i·K + k, which is the column of
``kron(W1, W2.reshape(b, d·K))`` — so the 2-D form holds for convs unchanged.

The scale is fixed by the file's convention (see :mod:`loratools.formats.lycoris`): LyCORIS uses
``alpha / lora_dim`` when either factor is low-rank and 1 when both are full; PEFT always
``alpha / r``. It is stored here as it applies.

Exact math without the dense ΔW (the mixed-product property and the SVD of a Kronecker product):

- factored form: with Wᵢ = Pᵢ Qᵢ, ``W1 ⊗ W2 = (P1 ⊗ P2)(Q1 ⊗ Q2)`` — width q1·q2;
- spectrum: with Wᵢ = Uᵢ Sᵢ Vᵢᵀ, ``W1 ⊗ W2 = (U1 ⊗ U2)(S1 ⊗ S2)(V1 ⊗ V2)ᵀ``, and U1 ⊗ U2, V1 ⊗ V2
  have orthonormal columns: the singular values are all products σᵢ(W1)·σⱼ(W2), with singular
  vectors ``kron(u1ᵢ, u2ⱼ)``, ``kron(v1ᵢ, v2ⱼ)``. The optimal rank-R approximation (Eckart–Young)
  keeps the R largest products; only the two small SVDs are ever computed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loratools.adapter import check_weight_shape
from loratools.linalg import Svd, exact_svd, factored_svd

__all__ = ["LokrWeight", "kron_svd"]


def _identity_split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as a product P @ Q of the narrowest width: (I, W) or (W, I)."""
    rows, cols = w.shape
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype, device=w.device), w
    return w, torch.eye(cols, dtype=w.dtype, device=w.device)


def kron_svd(svd1: Svd, svd2: Svd, rank: int | None = None) -> Svd:
    """The SVD of ``M1 ⊗ M2`` from those of M1 and M2, truncated to the top ``rank`` triplets.

    Args:
        svd1: u (a, n1), s (n1,), vh (n1, c).
        svd2: u (b, n2), s (n2,), vh (n2, d).
        rank: how many triplets to build (default all n1·n2); the singular values returned
            are always all n1·n2 products, descending, so energies stay exact.

    Returns:
        Svd with u (a·b, R), s (n1·n2,), vh (R, c·d), R = min(rank, n1·n2); u[:, t] =
        kron(u1ᵢ, u2ⱼ) and vh[t] = kron(v1ᵢ, v2ⱼ) for the t-th largest σ1ᵢ·σ2ⱼ.
    """
    products = svd1.s[:, None] * svd2.s[None, :]  # (n1, n2)
    s, order = products.flatten().sort(descending=True)
    keep = order[: rank if rank is not None else order.numel()]
    i, j = keep // svd2.s.numel(), keep % svd2.s.numel()
    a, b = svd1.u.shape[0], svd2.u.shape[0]
    u = (svd1.u[:, i][:, None, :] * svd2.u[:, j][None, :, :]).reshape(a * b, -1)  # (a·b, R)
    c, d = svd1.vh.shape[1], svd2.vh.shape[1]
    vh = (svd1.vh[i][:, :, None] * svd2.vh[j][:, None, :]).reshape(-1, c * d)  # (R, c·d)
    return Svd(u, s, vh)


@dataclass(frozen=True)
class LokrWeight:
    """One module's LoKr factors, as stored (float32 math, stored dtype kept).

    Attributes:
        w1: ``lokr_w1`` (a, c), or None when low-rank.
        w1_a, w1_b: ``lokr_w1_a`` (a, r), ``lokr_w1_b`` (r, c), or None.
        w2: ``lokr_w2`` (b, d) or conv (b, d, kh, kw), or None when low-rank.
        w2_a, w2_b: ``lokr_w2_a`` (b, r), ``lokr_w2_b`` (r, d·kh·kw) — with ``t2``, (r, b) and (r, d).
        t2: ``lokr_t2`` Tucker core (r, r, kh, kw), or None.
        alpha: the module's alpha as stored.
        scale: the multiplier of W1 ⊗ W2, as the file's convention sets it.
        weight_shape: the base weight's shape when it is not 2-D (conv (out, in, kh, kw)).
    """

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    alpha: float
    scale: float
    t2: torch.Tensor | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1, or lokr_w1_a with lokr_w1_b (exactly one form)")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2, or lokr_w2_a with lokr_w2_b (exactly one form)")
        (p1, q1), (p2, q2) = self._shapes(1), self._shapes(2)
        if p1[1] != q1[0] or p2[1] != q2[0]:
            raise ValueError(f"LoKr factors do not fit: W1 = {p1}·{q1}, W2 = {p2}·{q2}")
        check_weight_shape(self.weight_shape, self.shape)

    def _shapes(self, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(P shape, Q shape) of W1 = P1 Q1 or W2 = P2 Q2, without computing them."""
        full, up, down = (self.w1, self.w1_a, self.w1_b) if factor == 1 else (self.w2, self.w2_a, self.w2_b)
        if full is not None:
            rows, cols = int(full.shape[0]), int(full[0].numel())
            width = min(rows, cols)
            return (rows, width), (width, cols)
        assert up is not None and down is not None  # checked in __post_init__
        if factor == 2 and self.t2 is not None:
            taps = int(self.t2[0, 0].numel())
            return (int(up.shape[1]), int(up.shape[0])), (int(down.shape[0]), int(down.shape[1]) * taps)
        return (int(up.shape[0]), int(up.shape[1])), (int(down.shape[0]), int(down[0].numel()))

    @property
    def kind(self) -> str:
        return "lokr"

    @property
    def shape(self) -> tuple[int, int]:
        (p1, q1), (p2, q2) = self._shapes(1), self._shapes(2)
        return (p1[0] * p2[0], q1[1] * q2[1])

    @property
    def rank(self) -> int:
        """Width of the factored form: q1·q2 (an upper bound of rank(ΔW))."""
        return self._shapes(1)[0][1] * self._shapes(2)[0][1]

    @property
    def dim(self) -> int | None:
        """LyCORIS's ``lora_dim``: the rank of the low-rank factor(s), None when both are full."""
        down = self.w1_b if self.w1_b is not None else self.w2_b  # (r, …) in every layout
        return None if down is None else int(down.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by their LyCORIS/PEFT part name (``lokr_w1``, ``lokr_w2_a``, …)."""
        parts = {
            "lokr_w1": self.w1, "lokr_w1_a": self.w1_a, "lokr_w1_b": self.w1_b,
            "lokr_w2": self.w2, "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b, "lokr_t2": self.t2,
        }  # fmt: skip
        return {name: t for name, t in parts.items() if t is not None}

    def factor_pairs(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((P1, Q1), (P2, Q2)) float32 with W1 = P1 @ Q1 (a, c) and W2 = P2 @ Q2 (b, d·kh·kw)."""
        return self._pair(self.w1, self.w1_a, self.w1_b, None), self._pair(
            self.w2, self.w2_a, self.w2_b, self.t2
        )

    @staticmethod
    def _pair(
        full: torch.Tensor | None,
        up: torch.Tensor | None,
        down: torch.Tensor | None,
        core: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if full is not None:
            return _identity_split(full.float().reshape(full.shape[0], -1))
        assert up is not None and down is not None
        if core is not None:
            a = torch.einsum("ijk,je->iek", core.float().flatten(2), down.float())  # (r, d, K)
            return up.float().T, a.reshape(a.shape[0], -1)
        return up.float(), down.float().reshape(down.shape[0], -1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 (a, c), W2 (b, d·kh·kw)) in float32, unscaled."""
        (p1, q1), (p2, q2) = self.factor_pairs()
        return p1 @ q1, p2 @ q2

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·(P1 ⊗ P2), Q1 ⊗ Q2)``, float32 (out, q1·q2) and (q1·q2, in·kh·kw)."""
        (p1, q1), (p2, q2) = self.factor_pairs()
        return torch.kron(p1, p2) * self.scale, torch.kron(q1, q2)

    def delta(self) -> torch.Tensor:
        """The dense ΔW = s·(W1 ⊗ W2), float32 (out, in·kh·kw). Prefer the factored forms."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scale

    def svd(self, rank: int | None = None) -> Svd:
        """The exact SVD of ΔW from the SVDs of W1 and W2 (see the module docstring).

        Args:
            rank: how many singular vectors to build; singular values are always all of them.

        Returns:
            Svd of ΔW: u (out, R), s (all products, descending, times |s|), vh (R, in·kh·kw).
        """
        full1, full2 = self.w1, self.w2
        pair1, pair2 = self.factor_pairs()
        svd1 = exact_svd(full1.float()) if full1 is not None else factored_svd(*pair1)
        svd2 = (
            exact_svd(full2.float().reshape(full2.shape[0], -1))
            if full2 is not None
            else factored_svd(*pair2)
        )
        svd = kron_svd(svd1, svd2, rank)
        sign = -1.0 if self.scale < 0 else 1.0  # σ ≥ 0: a negative scale flips u
        return Svd(svd.u * sign, svd.s * abs(self.scale), svd.vh)

    def singular_values(self) -> torch.Tensor:
        """All singular values of ΔW, descending (products of the factors' singular values)."""
        return self.svd(rank=0).s

    def to(self, dtype: torch.dtype) -> LokrWeight:
        """The same module with every stored tensor cast to ``dtype``."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return replace(
            self,
            w1=cast(self.w1),
            w1_a=cast(self.w1_a),
            w1_b=cast(self.w1_b),
            w2=cast(self.w2),
            w2_a=cast(self.w2_a),
            w2_b=cast(self.w2_b),
            t2=cast(self.t2),
        )
