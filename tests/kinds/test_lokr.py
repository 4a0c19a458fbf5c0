"""LoKr: factored form and exact spectrum from the small factors' SVDs, checked against dense math."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import ModuleWeight
from loratools.kinds.lokr import LokrWeight
from tests.tolerances import F32_SVD, TOL


def _lokr(**parts: torch.Tensor | None) -> LokrWeight:
    names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
    return LokrWeight(**{n: parts.get(n) for n in names}, alpha=4.0, scale=0.5, t2=parts.get("t2"))  # type: ignore[arg-type]


CASES = {
    "full-full": {"w1": torch.randn(4, 3), "w2": torch.randn(6, 5)},
    "full-lowrank": {"w1": torch.randn(4, 3), "w2_a": torch.randn(6, 2), "w2_b": torch.randn(2, 5)},
    "lowrank-lowrank": {
        "w1_a": torch.randn(4, 2), "w1_b": torch.randn(2, 3), "w2_a": torch.randn(6, 2), "w2_b": torch.randn(2, 5),
    },
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_factored_form_equals_the_kronecker_product(case: str) -> None:
    w = _lokr(**CASES[case])
    assert isinstance(w, ModuleWeight) and w.kind == "lokr" and w.shape == (24, 15)
    w1, w2 = w.factors()
    expected = torch.kron(w1, w2) * 0.5
    torch.testing.assert_close(w.delta(), expected, **TOL[torch.float32])
    left, right = w.scaled_factors()
    assert left.shape[1] == w.rank
    torch.testing.assert_close(left @ right, expected, **TOL[torch.float32])


@pytest.mark.parametrize("case", sorted(CASES))
def test_spectrum_is_the_products_of_the_factor_spectra(case: str) -> None:
    w = _lokr(**CASES[case])
    dense = torch.linalg.svdvals(w.delta().double()).float()
    s = w.singular_values()
    n = min(len(s), len(dense))
    # float32 SVDs of small matrices: relative to σ₁, a few ulps
    torch.testing.assert_close(s[:n], dense[:n], rtol=1e-4, atol=1e-5 * float(dense[0]))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_truncated_svd_reaches_the_eckart_young_error(rank: int) -> None:
    w = _lokr(w1=torch.randn(5, 4), w2_a=torch.randn(6, 3), w2_b=torch.randn(3, 7))
    delta = w.delta().double()
    dense = torch.linalg.svdvals(delta)
    optimum = float(dense[rank:].square().sum().sqrt())
    svd = w.svd(rank)
    approx = (svd.u * svd.s[:rank]) @ svd.vh
    error = float((delta - approx.double()).norm())
    # float32 SVD: ≤ 1.001× the optimum plus a few ulps of σ₁
    assert error <= 1.001 * optimum + 1e-5 * float(dense[0])


def test_negative_scale_keeps_singular_values_positive() -> None:
    w = LokrWeight(torch.randn(3, 3), None, None, torch.randn(4, 4), None, None, alpha=-1.0, scale=-1.0)
    svd = w.svd(16)
    assert bool((svd.s >= 0).all())
    # U·diag(s)·Vᵀ rebuilt from a float32 SVD
    torch.testing.assert_close((svd.u * svd.s) @ svd.vh, w.delta(), **F32_SVD)


def test_conv_lokr_matches_torch_kron_of_the_kernels() -> None:
    # LyCORIS make_kron: W1 (a, c) → (a, c, 1, 1), kron with W2 (b, d, kh, kw) → (a·b, c·d, kh, kw)
    w1, w2 = torch.randn(2, 3), torch.randn(4, 5, 3, 3)
    w = LokrWeight(w1, None, None, w2, None, None, alpha=1.0, scale=1.0, weight_shape=(8, 15, 3, 3))
    expected = torch.kron(w1[:, :, None, None], w2).reshape(8, -1)
    torch.testing.assert_close(w.delta(), expected, **TOL[torch.float32])
    left, right = w.scaled_factors()
    torch.testing.assert_close(left @ right, expected, **TOL[torch.float32])


def test_tucker_w2_matches_the_peft_rebuild() -> None:
    r = 2
    t2, w2_a, w2_b = torch.randn(r, r, 3, 3), torch.randn(r, 4), torch.randn(r, 5)
    w1 = torch.randn(2, 3)
    w = LokrWeight(w1, None, None, None, w2_a, w2_b, alpha=2.0, scale=1.0, t2=t2, weight_shape=(8, 15, 3, 3))
    rebuilt = torch.einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b).contiguous()  # PEFT make_weight_cp
    expected = torch.kron(w1[:, :, None, None], rebuilt).reshape(8, -1)
    # float32 einsum/kron in another order, O(1) entries
    torch.testing.assert_close(w.delta(), expected, rtol=1e-5, atol=1e-5)
    assert w.dim == 2
    dense = torch.linalg.svdvals(expected.double()).float()
    s = w.singular_values()
    assert len(s) == 4  # rank(W1) · rank(W2) = 2 · 2
    # Kronecker σ's are products of the factors' float32 σ's
    torch.testing.assert_close(s, dense[:4], rtol=1e-4, atol=1e-5 * float(dense[0]))
    # rank 4 exactly: the rest is float32 rounding of σ₁
    assert float(dense[4:].max()) < 1e-5 * float(dense[0])


def test_factors_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="exactly one form"):
        LokrWeight(
            torch.randn(2, 2), torch.randn(2, 1), torch.randn(1, 2), torch.randn(3, 3), None, None, 1.0, 1.0
        )
