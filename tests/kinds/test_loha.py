"""LoHa: the Khatri–Rao factored form equals the dense Hadamard product, for Linear, conv and Tucker."""

from __future__ import annotations

import torch

from loratools.adapter import ModuleWeight
from loratools.kinds.loha import LohaWeight, khatri_rao_factors
from loratools.linalg import factored_svd
from tests.tolerances import TOL


def _dense(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    return (b1 @ a1) * (b2 @ a2)


def test_khatri_rao_factors_give_the_hadamard_product() -> None:
    b1, a1, b2, a2 = torch.randn(7, 3), torch.randn(3, 9), torch.randn(7, 2), torch.randn(2, 9)
    left, right = khatri_rao_factors((b1, a1), (b2, a2))
    assert left.shape == (7, 6) and right.shape == (6, 9)
    torch.testing.assert_close(left @ right, _dense(b1, a1, b2, a2), **TOL[torch.float32])


def test_linear_loha_scaled_factors_and_delta() -> None:
    w = LohaWeight(torch.randn(12, 4), torch.randn(4, 10), torch.randn(12, 4), torch.randn(4, 10), alpha=2.0)
    assert isinstance(w, ModuleWeight) and w.kind == "loha"
    assert w.shape == (12, 10) and w.rank == 16 and w.scale == 0.5
    expected = _dense(w.w1_a, w.w1_b, w.w2_a, w.w2_b) * 0.5
    torch.testing.assert_close(w.delta(), expected, **TOL[torch.float32])
    left, right = w.scaled_factors()
    torch.testing.assert_close(left @ right, expected, **TOL[torch.float32])


def test_factored_spectrum_equals_the_dense_one() -> None:
    w = LohaWeight(torch.randn(40, 3), torch.randn(3, 30), torch.randn(40, 3), torch.randn(3, 30), alpha=3.0)
    s = factored_svd(*w.scaled_factors()).s
    dense = torch.linalg.svdvals(w.delta().double()).float()
    assert torch.linalg.matrix_rank(w.delta()) <= 9  # rank ≤ r1·r2
    # singular values of a float32 product: relative to σ₁, a few ulps of the 9-term sums
    torch.testing.assert_close(s[:9], dense[:9], rtol=1e-4, atol=1e-5 * float(dense[0]))


def test_conv_loha_is_the_flattened_kernel() -> None:
    # LyCORIS non-Tucker conv LoHa: hada_w*_b hold (r, in·kh·kw); ΔW reshapes to the kernel
    w = LohaWeight(
        torch.randn(6, 2), torch.randn(2, 4 * 9), torch.randn(6, 2), torch.randn(2, 4 * 9),
        alpha=1.0, weight_shape=(6, 4, 3, 3),
    )  # fmt: skip
    assert w.shape == (6, 36)
    left, right = w.scaled_factors()
    torch.testing.assert_close(left @ right, w.delta(), **TOL[torch.float32])


def test_tucker_loha_matches_the_lycoris_rebuild() -> None:
    r, out, inn = 3, 5, 4
    t1, t2 = torch.randn(r, r, 3, 3), torch.randn(r, r, 3, 3)
    w1_a, w1_b, w2_a, w2_b = (
        torch.randn(r, out),
        torch.randn(r, inn),
        torch.randn(r, out),
        torch.randn(r, inn),
    )
    w = LohaWeight(w1_a, w1_b, w2_a, w2_b, alpha=6.0, t1=t1, t2=t2, weight_shape=(out, inn, 3, 3))
    # LyCORIS/PEFT make_weight_cp: einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)
    rebuild1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a)
    rebuild2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)
    expected = (rebuild1 * rebuild2 * 2.0).reshape(out, -1)
    assert w.shape == (out, inn * 9) and w.rank == 9
    torch.testing.assert_close(w.delta(), expected, rtol=1e-5, atol=1e-4)  # float32 sums of 9 terms
    left, right = w.scaled_factors()
    torch.testing.assert_close(left @ right, expected, rtol=1e-5, atol=1e-4)  # float32 sums of 9 terms


def test_to_casts_every_tensor() -> None:
    w = LohaWeight(torch.randn(4, 2), torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3), alpha=2.0)
    half = w.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in half.tensors().values())
    assert half.num_parameters == w.num_parameters == 28
