"""Property tests for the shared linear algebra (Eckart–Young, factored SVD, energy, budgets)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools import linalg
from loratools.errors import InvalidOptions, LoratoolsError
from loratools.linalg import RankRule, energy_kept, exact_svd, lora_from_svd
from tests.tolerances import F64_MATH, TOL

F64 = TOL[torch.float64]


def low_rank_plus_noise(d: int, k: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(d, rank, generator=gen) @ torch.randn(rank, k, generator=gen)
    return signal + noise * torch.randn(d, k, generator=gen)


def optimal_error_sq(m: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[rank:].square().sum())


shapes = st.tuples(st.integers(2, 48), st.integers(2, 48))

# The range finder's two paths, on any CPU: float32 throughout, and a bfloat16 copy polished in
# float32 (what CPUs with bf16 units and CUDA run by default; forced here where they do not).
FINDERS = {"float32": lambda m: m, "bfloat16": lambda m: m.bfloat16()}


@settings(max_examples=40, deadline=None)
@given(shape=shapes, rank=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_exact_truncation_residual_is_the_tail_energy(shape, rank, seed) -> None:
    """Eckart–Young: ‖M − B·A‖²_F = Σ_{i>r} σᵢ² for the truncated SVD."""
    m = low_rank_plus_noise(*shape, rank=3, noise=0.1, seed=seed).double()
    rank = min(rank, min(shape))
    b, a = linalg.exact_svd(m).truncate(rank).factors()
    residual = float((m - b @ a).square().sum())
    # float64 SVD: residual vs Σ_{i>r} σᵢ² up to float64 rounding (1e-8 relative is slack)
    assert residual == pytest.approx(optimal_error_sq(m, rank), rel=1e-8, abs=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    signal=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    split=st.sampled_from(["sqrt", "b"]),
    finder=st.sampled_from(sorted(FINDERS)),
)
def test_exact_recovery_when_rank_is_at_least_the_signal(shape, signal, seed, split, finder) -> None:
    """Also after a bfloat16 range finder: its tilt (~2⁻⁹) must not survive the float32 polish."""
    m = low_rank_plus_noise(*shape, rank=signal, noise=0.0, seed=seed)
    rank = min(signal, min(shape))
    b, a = linalg.randomized_svd(m, rank, range_copy=FINDERS[finder](m)).factors(split)
    assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
    # float32 randomized SVD of an exact-rank matrix: only float32 rounding, ~n·2⁻²⁴·max|M|
    torch.testing.assert_close(b @ a, m, rtol=1e-4, atol=1e-4 * float(m.abs().max()))


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize(("rank", "bound"), [(8, 1.001), (16, 1.001), (24, 1.01), (64, 1.01)])
def test_randomized_error_is_within_bound_of_optimal(rank: int, bound: float, finder: str) -> None:
    """Signal rank 16 in 300×200 with noise: at or below the signal rank within 0.1%, above it
    (inside the flat noise) within 1% — the adaptive iterations must earn it."""
    m = low_rank_plus_noise(300, 200, 16, noise=0.05, seed=1)
    svd = linalg.randomized_svd(m, rank, range_copy=FINDERS[finder](m))
    b, a = svd.factors()
    error = math.sqrt(float((m - b @ a).double().square().sum()))
    optimal = math.sqrt(optimal_error_sq(m, rank))
    assert optimal <= error * (1 + 1e-6)  # Eckart–Young; 1e-6: float32 rounding of the error
    assert error <= bound * optimal


@pytest.mark.parametrize("finder", FINDERS)
def test_exact_low_rank_at_scale_is_recovered_to_float32(finder: str) -> None:
    """Rank 12 exactly in 600×400, rank 12 asked: nothing left but float32 rounding — a bf16
    range finder's tilt (which alone would leave ~1e-3) is polished away."""
    m = low_rank_plus_noise(600, 400, 12, noise=0.0, seed=7)
    svd = linalg.randomized_svd(m, 12, range_copy=FINDERS[finder](m))
    relative = float((m - svd.u * svd.s @ svd.vh).norm() / m.norm())
    assert relative < 1e-5  # float32 products of a 400-long inner dimension: ~1e-6


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_a_slowly_decaying_spectrum_converges_after_a_bfloat16_finder(alpha: float) -> None:
    """σᵢ = i^-α, no gap anywhere (a full fine-tune's ΔW): within 0.2% of optimal at ranks 16 and 64."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(512, 384, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(384, 384, generator=gen)).Q
    m = (u * torch.arange(1, 385, dtype=torch.float32) ** -alpha) @ v.T
    for rank in (16, 64):
        svd = linalg.randomized_svd(m, rank, range_copy=m.bfloat16())
        error = math.sqrt(float((m - svd.u * svd.s @ svd.vh).double().square().sum()))
        # no gap to stop at: 0.2% as the float32 finder reaches here (its rule stops at 0.1% per iteration)
        assert error <= 1.002 * math.sqrt(optimal_error_sq(m, rank)), rank


def test_range_dtype_is_float32_or_a_faster_bfloat16() -> None:
    assert linalg.range_dtype(torch.device("cpu")) in (torch.float32, torch.bfloat16)
    assert linalg.range_dtype(torch.device("cuda")) == torch.bfloat16


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_factored_svd_equals_dense_svd(d, k, r, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(d, r, generator=gen, dtype=torch.float64)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64)
    svd = linalg.factored_svd(b, a)
    dense = torch.linalg.svdvals(b @ a)
    n = min(d, k, r)
    torch.testing.assert_close(svd.s[:n], dense[:n], **F64_MATH)
    torch.testing.assert_close(svd.u @ torch.diag(svd.s) @ svd.vh, b @ a, **F64)
    assert bool((svd.s[:-1] >= svd.s[1:] - 1e-12).all())  # float64 σ's sorted up to rounding


def test_factored_svd_sum_is_the_svd_of_the_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    pairs = [
        (torch.randn(30, r, generator=gen).double(), torch.randn(r, 20, generator=gen).double())
        for r in (2, 5)
    ]
    dense = sum(b @ a for b, a in pairs)
    svd = linalg.factored_svd_sum(pairs)
    torch.testing.assert_close(svd.u * svd.s @ svd.vh, dense, **F64)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), fraction=st.floats(0.01, 1.0))
def test_rank_for_energy_is_the_smallest_rank_reaching_the_fraction(values, fraction) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r = linalg.rank_for_energy(s, fraction)
    total = float(s.square().sum())
    if total == 0:
        assert r == 1
        return
    kept = float(s[:r].square().sum()) / total
    assert kept >= fraction - 1e-9  # float64 rounding of the energy sums
    if r > 1:
        # float64 rounding of the energy sums
        assert float(s[: r - 1].square().sum()) / total < fraction + 1e-9
    curve = linalg.energy_curve(s)
    assert float(curve[-1]) == pytest.approx(1.0)
    assert bool((curve[1:] >= curve[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30))
def test_stable_rank_is_between_one_and_the_rank(values) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    sr = linalg.stable_rank(s)
    nonzero = int((s > 0).sum())
    if nonzero == 0:
        assert sr == 0.0
    else:
        assert 1.0 - 1e-9 <= sr <= nonzero + 1e-9  # float64 rounding of the ratio


@settings(max_examples=60, deadline=None)
@given(
    spectra=st.lists(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=10), min_size=1, max_size=6),
    extra=st.integers(0, 20),
)
def test_budget_allocation_keeps_the_most_energy(spectra, extra) -> None:
    tensors = {f"m{i}": torch.tensor(sorted(s, reverse=True)) for i, s in enumerate(spectra)}
    budget = len(tensors) + extra
    ranks = linalg.allocate_budget(tensors, budget)
    assert sum(ranks.values()) == min(budget, sum(len(s) for s in spectra))
    assert all(1 <= ranks[n] <= len(t) for n, t in tensors.items())
    kept = sum(float(t[: ranks[n]].square().sum()) for n, t in tensors.items())
    # brute force: the best choice is the top σ² beyond each module's first value
    firsts = sum(float(t[0] ** 2) for t in tensors.values())
    rest = sorted((float(v**2) for t in tensors.values() for v in t[1:]), reverse=True)
    best = firsts + sum(rest[: budget - len(tensors)])
    assert kept == pytest.approx(best, rel=1e-6, abs=1e-6)  # float32 σ² summed in another order: ~1e-7


def test_budget_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        linalg.allocate_budget({"a": torch.ones(3), "b": torch.ones(3)}, 1)


# -- rank rules and energy ------------------------------------------------------------------------
def test_rank_rule_chooses_each_way() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, 0.25 of 21.25
    assert RankRule(rank=2).choose(s) == 2 and RankRule(rank=9).choose(s) == 4
    assert RankRule(energy=16 / 21.25).choose(s) == 1 and RankRule(energy=0.98).choose(s) == 3
    assert RankRule(energy=0.9).choose(s[:2], total=100.0) == 2  # a truncated spectrum: all it has
    assert RankRule(sv_threshold=1.0).choose(s) == 3
    assert RankRule(sv_threshold=5.0).choose(s) == 0 and RankRule(sv_threshold=5.0).choose(s, at_least=1) == 1
    spectra = {"a": s, "b": s / 4}
    assert RankRule(budget=4).ranks(spectra) == {"a": 3, "b": 1}  # σ² 16, 4, 1 | 1 → the top four
    assert RankRule(budget=4, min_rank=2).ranks(spectra) == {"a": 2, "b": 2}
    with pytest.raises(LoratoolsError, match="budget of 3 cannot give 2 modules rank 2"):
        RankRule(budget=3, min_rank=2).ranks(spectra)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rank": 0}, r"-r/--rank must be at least 1 \(got 0\)"),
        ({"energy": float("nan")}, r"--energy must be in \(0, 1\], e.g. 0.9 \(got nan\)"),
        ({"sv_threshold": -1.0}, r"--sv-threshold must be ≥ 0 \(got -1.0\)"),
        ({"budget": 0}, r"--budget must be at least 1 \(got 0\)"),
        ({"budget": 4, "min_rank": 0}, r"--min-rank must be at least 1 \(got 0\)"),
    ],
)
def test_rank_rule_refuses_values_out_of_range(values: dict, message: str) -> None:
    with pytest.raises(InvalidOptions, match=message):
        RankRule(**values)


def test_rank_rule_check_names_what_the_command_offers() -> None:
    with pytest.raises(
        InvalidOptions, match=r"choose exactly one of -r/--rank, --energy or --budget \(got none\)"
    ):
        RankRule().check(("rank", "energy", "budget"))
    with pytest.raises(InvalidOptions, match=r"got --sv-threshold"):
        RankRule(sv_threshold=1.0).check(("rank", "energy", "budget"))  # not offered
    with pytest.raises(InvalidOptions, match=r"-r/--rank or --energy, not both \(got --rank, --energy\)"):
        RankRule(rank=2, energy=0.5).check(("rank", "energy"), required=False)
    RankRule().check(("rank", "energy"), required=False)
    assert RankRule(energy=0.5).name == "energy" and RankRule().name is None


def test_energy_kept_and_lora_from_svd_fold_alpha() -> None:
    m = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    svd = exact_svd(m)
    total = float(m.double().square().sum())
    kept = energy_kept(svd.s, 3)
    assert kept == pytest.approx(float(svd.s[:3].double().square().sum()) / total, rel=1e-6)  # float32 SVD
    assert energy_kept(svd.s, 9) == 1.0 and energy_kept(torch.zeros(3), 1) == 1.0
    best = svd.truncate(3)
    target = best.u @ torch.diag(best.s) @ best.vh
    for split in ("sqrt", "b"):
        for alpha in (None, 16.0):
            weight = lora_from_svd(svd, 3, split, torch.float32, alpha)
            assert weight.alpha == (3.0 if alpha is None else alpha)
            b, a = weight.scaled_factors()
            # float32 products of O(1) entries, 9-term sums: 1e-5 is ~100 ulps
            torch.testing.assert_close(b @ a, target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_range_finder_products_are_the_products(monkeypatch: pytest.MonkeyPatch, onednn: bool, dtype) -> None:
    """M·X and Mᵀ·Q, through oneDNN or ``@``, against float64 products of the same (rounded) operands."""
    monkeypatch.setattr(linalg, "_ONEDNN", [onednn and linalg._ONEDNN[0]])
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(1, 300, 200, generator=gen).to(dtype)
    x, q = torch.randn(200, 24, generator=gen), torch.randn(1, 300, 24, generator=gen)
    y = linalg._times(m, x, torch.float32)
    z = linalg._transposed_times(m, q, torch.float32)
    y_ref = m[0].double() @ x.to(dtype).double()
    z_ref = m[0].double().T @ q[0].to(dtype).double()
    # float32 sums of ≤ 300 products: ~1e-6 relative; a bfloat16 result is rounded once more (2⁻⁹)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2.0**-8, "atol": 0.05}
    torch.testing.assert_close(y[0].double(), y_ref, **tol)
    torch.testing.assert_close(z[0].double(), z_ref, **tol)
    assert y.dtype == z.dtype == torch.float32 and y.shape == (1, 300, 24) and z.shape == (1, 200, 24)


def test_frobenius_is_accurate_where_a_float32_norm_drifts() -> None:
    """16.8 M float32 elements (a 4096×4096 ΔW): torch's one-accumulator float32 norm is off by
    ~7e-4 there; rows summed in float64 stay at float32 rounding (~1e-7)."""
    m = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    exact = float(torch.linalg.vector_norm(m, dtype=torch.float64))
    assert linalg.frobenius(m) == pytest.approx(exact, rel=1e-6)  # float32 rows of 4096: ~1e-7
    assert linalg.frobenius(m.reshape(16, 256, 4096)) == pytest.approx(exact, rel=1e-6)
    assert linalg.frobenius(m[0]) == pytest.approx(float(m[0].double().norm()), rel=1e-6)  # the same rounding
    bf16 = m.bfloat16()  # rows upcast to float32: the same rounding
    assert linalg.frobenius(bf16) == pytest.approx(float(bf16.double().norm()), rel=1e-6)
    assert linalg.frobenius(torch.empty(0, 3)) == 0.0
    stack = m.reshape(4, 1024, 4096)
    exact_sq = stack.double().square().sum(dim=(1, 2))
    same_rounding = {"rtol": 1e-6, "atol": 0.0}  # float32 rows of 4096, summed in float64: ~1e-7
    torch.testing.assert_close(linalg.squared_norms(stack), exact_sq, **same_rounding)


def test_a_transposed_matrix_gets_the_same_svd() -> None:
    """A strided (transposed) view multiplies as well as a contiguous matrix: σ agree."""
    m = low_rank_plus_noise(200, 300, 8, noise=0.01, seed=3)
    contiguous_t = m.T.contiguous()
    a, b = linalg.randomized_svd(m.T, 8), linalg.randomized_svd(contiguous_t, 8)
    # one matrix, one sketch, products in two memory layouts: float32 rounding of σ (~1e-6)
    torch.testing.assert_close(a.s, b.s, rtol=1e-4, atol=1e-5)
