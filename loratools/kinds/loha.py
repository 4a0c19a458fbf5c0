"""LoHa (FedPara; Hyeon-Woo et al., 2022, https://arxiv.org/abs/2108.06098): a Hadamard product of
two low-rank products, as LyCORIS and PEFT train it::

    ΔW = s · (B1 @ A1) ⊙ (B2 @ A2),   B1, B2: (out, r),  A1, A2: (r, in·kh·kw),  s = alpha / r

(LyCORIS and PEFT name them ``hada_w1_a`` = B1, ``hada_w1_b`` = A1, ``hada_w2_a`` = B2,
``hada_w2_b`` = A2.) A conv's ΔW is this 2-D matrix reshaped to (out, in, kh, kw).

Tucker form (LyCORIS ``use_tucker``, PEFT ``use_effective_conv2d``): each half is a core
``hada_t1`` (r, r, kh, kw) with ``hada_w1_a`` (r, out) and ``hada_w1_b`` (r, in)::

    W1[p, c, k] = Σ_ij t1[i, j, k] · w1_a[i, p] · w1_b[j, c]

which is again ``B1 @ A1`` with B1 = w1_aᵀ (out, r) and A1[i, (c, k)] = Σ_j t1[i, j, k] w1_b[j, c]
(r, in·kh·kw): a half is always a rank-r product, whichever way it is stored.

The factored form of width r1·r2 (Khatri–Rao, or face-splitting, product)::

    [(B1 A1) ⊙ (B2 A2)]_ij = (Σ_p B1_ip A1_pj)(Σ_q B2_iq A2_qj) = Σ_(p,q) (B1_ip B2_iq)(A1_pj A2_qj)
                           = Σ_(p,q) L_i,(p,q) · R_(p,q),j

so ΔW = s·L @ R with row i of L = kron(B1[i], B2[i]) (out, r1·r2) and column j of
R = kron(A1[:, j], A2[:, j]) (r1·r2, in). Hence rank(ΔW) ≤ r1·r2, and spectra and optimal
LoRA conversions run through the factored SVD of (s·L, R) — O((out + in)·(r1·r2)²), never the
dense out×in matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loratools.adapter import check_weight_shape

__all__ = ["LohaWeight", "khatri_rao_factors"]


def khatri_rao_factors(
    half1: tuple[torch.Tensor, torch.Tensor], half2: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R = (B1 @ A1) ⊙ (B2 @ A2)`` (see the module docstring).

    Args:
        half1: B1 (out, r1), A1 (r1, in).
        half2: B2 (out, r2), A2 (r2, in).

    Returns:
        L (out, r1·r2): row i = kron(B1[i], B2[i]); R (r1·r2, in): column j = kron(A1[:, j], A2[:, j]).
    """
    (b1, a1), (b2, a2) = half1, half2
    left = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)  # (out, r1·r2)
    right = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])  # (r1·r2, in)
    return left, right


def _tucker_half(
    core: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Tucker half (core (r, r, *k), up (r, out), down (r, in)) as B (out, r), A (r, in·Πk)."""
    core = core.float().flatten(2)  # (r, r, K)
    a = torch.einsum("ijk,jc->ick", core, down.float())  # (r, in, K): the column index is (c, k)
    return up.float().T, a.reshape(a.shape[0], -1)


@dataclass(frozen=True)
class LohaWeight:
    """One module's LoHa factors, as stored (float32 math, stored dtype kept).

    Attributes:
        w1_a, w1_b, w2_a, w2_b: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), and the same
            for the second half; with Tucker cores, (r, out) and (r, in).
        alpha: the module's alpha; scale = alpha / r with r = ``hada_w1_b``'s rows (LyCORIS and
            PEFT alike).
        t1, t2: ``hada_t1``/``hada_t2`` Tucker cores (r, r, kh, kw), or None.
        weight_shape: the base weight's shape when it is not 2-D (conv (out, in, kh, kw)).
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.t1 is None) != (self.t2 is None):
            raise ValueError("LoHa Tucker cores come in pairs: hada_t1 and hada_t2")
        (b1, a1), (b2, a2) = self._shapes(1), self._shapes(2)
        if b1[0] != b2[0] or a1[1] != a2[1] or b1[1] != a1[0] or b2[1] != a2[0]:
            raise ValueError(
                f"LoHa halves do not fit: B1 {b1} A1 {a1}, B2 {b2} A2 {a2} "
                "(expected B (out, r) and A (r, in) twice, with the same out and in)"
            )
        check_weight_shape(self.weight_shape, self.shape)

    def _shapes(self, half: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(B shape, A shape) of a half without computing it."""
        up, down, core = (self.w1_a, self.w1_b, self.t1) if half == 1 else (self.w2_a, self.w2_b, self.t2)
        if core is None:
            return (int(up.shape[0]), int(up.shape[1])), (int(down.shape[0]), int(down[0].numel()))
        taps = int(core[0, 0].numel())
        return (int(up.shape[1]), int(up.shape[0])), (int(down.shape[0]), int(down.shape[1]) * taps)

    @property
    def kind(self) -> str:
        return "loha"

    @property
    def dim(self) -> int:
        """LyCORIS's ``lora_dim``: the rank of each half (``hada_w1_b``'s rows)."""
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    @property
    def shape(self) -> tuple[int, int]:
        (b, a) = self._shapes(1)
        return (b[0], a[1])

    @property
    def rank(self) -> int:
        """Width of the factored form: r1·r2 (an upper bound of rank(ΔW))."""
        return self._shapes(1)[0][1] * self._shapes(2)[0][1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w1_a.dtype

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by their LyCORIS/PEFT part name (``hada_w1_a``, …, ``hada_t1``)."""
        parts = {
            "hada_w1_a": self.w1_a,
            "hada_w1_b": self.w1_b,
            "hada_w2_a": self.w2_a,
            "hada_w2_b": self.w2_b,
        }
        if self.t1 is not None and self.t2 is not None:
            parts |= {"hada_t1": self.t1, "hada_t2": self.t2}
        return parts

    def halves(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((B1, A1), (B2, A2)) in float32, each half's 2-D product ``B @ A`` (out, in·kh·kw)."""
        return self._half(self.w1_a, self.w1_b, self.t1), self._half(self.w2_a, self.w2_b, self.t2)

    @staticmethod
    def _half(
        up: torch.Tensor, down: torch.Tensor, core: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if core is not None:
            return _tucker_half(core, up, down)
        return up.float(), down.float().reshape(down.shape[0], -1)

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·L, R)``, float32 (out, r1·r2) and (r1·r2, in·kh·kw), ``s·L @ R = ΔW``."""
        left, right = khatri_rao_factors(*self.halves())
        return left * self.scale, right

    def delta(self) -> torch.Tensor:
        """The dense ΔW = s·(B1 A1) ⊙ (B2 A2), float32 (out, in·kh·kw). Prefer the factored form."""
        (b1, a1), (b2, a2) = self.halves()
        return (b1 @ a1) * (b2 @ a2) * self.scale

    def to(self, dtype: torch.dtype) -> LohaWeight:
        """The same module with every stored tensor cast to ``dtype``."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return replace(
            self,
            w1_a=self.w1_a.to(dtype),
            w1_b=self.w1_b.to(dtype),
            w2_a=self.w2_a.to(dtype),
            w2_b=self.w2_b.to(dtype),
            t1=cast(self.t1),
            t2=cast(self.t2),
        )
