"""Subspace similarity φ(i, j) (Section 7.2): its defining properties, across ranks and sides."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch
from loratools.ops.similarity import (
    SimilarityOptions,
    adapter_similarity,
    phi_matrix,
    principal_cosines,
    singular_basis,
)


def _weight(r: int, n_in: int, n_out: int, seed: int) -> LoraWeight:
    gen = torch.Generator().manual_seed(seed)
    return LoraWeight(torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen), 8.0)


def _naive_phi(u1: torch.Tensor, u2: torch.Tensor, i: int, j: int) -> float:
    """The paper's formula, literally."""
    return float(torch.linalg.matrix_norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j))


dims = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(12, 40), st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(dims, st.sampled_from(["right", "left"]))
def test_phi_of_an_adapter_with_itself_is_one(dim, side):
    r, _, n, seed = dim
    weight = _weight(r, n, n, seed)
    u = singular_basis(weight, side)
    phi = phi_matrix(u, u)
    # float64 SVD bases are orthonormal to ~n·2⁻⁵³ ≈ 1e-14
    torch.testing.assert_close(torch.diagonal(phi), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(dims)
def test_phi_is_in_unit_interval_symmetric_and_matches_the_formula(dim):
    r1, r2, n, seed = dim
    u1 = singular_basis(_weight(r1, n, 5, seed), "right")
    u2 = singular_basis(_weight(r2, n, 5, seed + 1), "right")
    phi, phi_t = phi_matrix(u1, u2), phi_matrix(u2, u1)
    assert phi.shape == (r1, r2)
    assert float(phi.min()) >= 0.0 and float(phi.max()) <= 1.0
    torch.testing.assert_close(phi_t, phi.T, rtol=0, atol=1e-12)  # so φ(i, i) is symmetric
    for i, j in [(1, 1), (r1, r2), (r1, 1), (1, r2), ((r1 + 1) // 2, (r2 + 1) // 2)]:
        # float64 both ways
        assert float(phi[i - 1, j - 1]) == pytest.approx(_naive_phi(u1, u2, i, j), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**16))
def test_nested_subspaces_across_ranks(r_small, seed):
    """A rank-r adapter whose A spans the top of a rank-64 adapter's A: φ = 1 wherever i ≤ r."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(96, 64, generator=gen, dtype=torch.float64)).Q  # (in, 64)
    big = torch.linspace(64, 1, 64, dtype=torch.float64)[:, None] * q.T  # (64, in), σ descending
    small = torch.linspace(9, 1, r_small, dtype=torch.float64)[:, None] * q[:, :r_small].T
    b = torch.zeros(16, 64, dtype=torch.float64)
    first = Adapter({"l.0.q_proj": LoraWeight(small, b[:, :r_small], 8.0)})
    second = Adapter({"l.0.q_proj": LoraWeight(big, b, 8.0)})
    module = adapter_similarity(first, second).modules[0]
    assert module.phi.shape == (r_small, 64)
    # φ = 1 exactly when one subspace holds the other; float64 over 64 dims: ~1e-13, 1e-10 slack
    torch.testing.assert_close(module.phi, torch.ones(r_small, 64, dtype=torch.float64), rtol=0, atol=1e-10)
    assert module.shared_directions() == r_small


def test_orthogonal_subspaces_have_zero_similarity():
    q = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64)).Q
    phi = phi_matrix(q[:, :4], q[:, 4:10])
    assert float(phi.abs().max()) < 1e-12  # float64 QR: orthogonal to ~1e-15
    # float64 cosines; ≪ any real overlap (≥ 1e-2)
    assert float(principal_cosines(q[:, :4], q[:, 4:10]).max()) < 1e-7


def test_partial_overlap_counts_shared_directions():
    q = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64)).Q
    u1 = q[:, [0, 1, 2, 3]]
    u2 = q[:, [0, 1, 10, 11]]  # shares two directions exactly, the rest orthogonal
    phi = phi_matrix(u1, u2)
    assert float(phi[1, 1]) == pytest.approx(1.0) and float(phi[3, 3]) == pytest.approx(0.5)
    cosines = principal_cosines(u1, u2)
    # float64 SVD of U₁ᵀU₂: ~1e-15; 1e-7 still far below a real mismatch (≥ 1e-2)
    torch.testing.assert_close(
        cosines, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_report_summary_and_unshared_modules():
    shared = _weight(4, 10, 6, seed=1)
    first = Adapter(
        {"l.0.q_proj": shared, "l.0.v_proj": _weight(4, 10, 6, 2), "l.0.k_proj": _weight(2, 10, 6, 3)}
    )
    second = Adapter(
        {"l.0.q_proj": shared, "l.0.v_proj": _weight(8, 10, 6, 4), "l.0.o_proj": _weight(2, 10, 6, 5)}
    )
    report = adapter_similarity(first, second)
    doc = report.to_dict()
    assert [m["name"] for m in doc["modules"]] == ["l.0.q_proj", "l.0.v_proj"]
    assert doc["only_in_first"] == ["l.0.k_proj"] and doc["only_in_second"] == ["l.0.o_proj"]
    q = doc["modules"][0]
    assert q["ranks"] == [4, 4] and q["shared_directions"] == 4 and q["diagonal_above_threshold"] == 4
    assert doc["modules"][1]["ranks"] == [4, 8]
    assert doc["summary"]["by_type"]["q_proj"]["mean_diagonal"] == pytest.approx([1.0] * 4)
    assert len(doc["summary"]["model"]["mean_diagonal"]) == 4


def test_left_side_uses_b():
    first, second = _weight(3, 10, 7, 1), _weight(3, 10, 7, 2)
    left = adapter_similarity(
        Adapter({"m": first}),
        Adapter({"m": LoraWeight(second.a, first.b, 8.0)}),
        SimilarityOptions(side="left"),
    ).modules[0]
    # float64 bases: ~1e-14
    torch.testing.assert_close(
        torch.diagonal(left.phi), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_errors():
    with pytest.raises(MissingKeys, match="no module in common"):
        adapter_similarity(Adapter({"a": _weight(2, 5, 5, 0)}), Adapter({"b": _weight(2, 5, 5, 0)}))
    with pytest.raises(ShapeMismatch, match="in_features"):
        adapter_similarity(Adapter({"a": _weight(2, 5, 5, 0)}), Adapter({"a": _weight(2, 6, 5, 0)}))
    adapter_similarity(
        Adapter({"a": _weight(2, 5, 5, 0)}), Adapter({"a": _weight(2, 5, 9, 0)})
    )  # B may differ
    with pytest.raises(LoratoolsError, match="--side"):
        SimilarityOptions(side="up")  # type: ignore[arg-type]
    with pytest.raises(LoratoolsError, match="--threshold"):
        SimilarityOptions(threshold=2.0)


def test_random_baseline_is_the_expected_phi_of_random_subspaces():
    gen = torch.Generator().manual_seed(11)
    n, r1, r2 = 20, 3, 5
    phis = []
    for _ in range(400):
        u1 = torch.linalg.qr(torch.randn(n, r1, generator=gen, dtype=torch.float64)).Q
        u2 = torch.linalg.qr(torch.randn(n, r2, generator=gen, dtype=torch.float64)).Q
        phis.append(float(phi_matrix(u1, u2)[-1, -1]))
    module = adapter_similarity(
        Adapter({"m": _weight(r1, n, 4, 0)}), Adapter({"m": _weight(r2, n, 4, 1)})
    ).modules[0]
    assert module.dimension == n and module.random_phi(r1, r2) == pytest.approx(5 / 20)
    # the mean of 400 draws (φ's spread ≈ 0.074): standard error ≈ 0.004, so 0.02 ≈ 5 of them
    assert sum(phis) / len(phis) == pytest.approx(module.random_phi(r1, r2), abs=0.02)
