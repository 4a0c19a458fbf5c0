"""ops/combine.py: exact and SVD sums against dense arithmetic, TIES/DARE, scaling rules, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, ShapeMismatch
from loratools.ops.combine import CombineOptions, combine_adapters, dare_merge, ties_merge, trim_magnitude
from tests.tolerances import TOL

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16), "layers.1.down_proj": (16, 40)}


def random_weight(
    shape: tuple[int, int], rank: int, alpha: float, *, rslora: bool = False, seed: int = 0
) -> LoraWeight:
    """Gaussian A and B (B non-zero, unlike a fresh LoRA), float32."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, rank, generator=gen) / rank**0.5
    return LoraWeight(a, b, alpha, rslora)


def random_adapter(
    rank: int, alpha: float, *, rslora: bool = False, seed: int = 0, shapes: dict | None = None
) -> Adapter:
    shapes = SHAPES if shapes is None else shapes
    weights = {
        name: random_weight(shape, rank, alpha, rslora=rslora, seed=seed * 100 + i)
        for i, (name, shape) in enumerate(shapes.items())
    }
    return Adapter(weights=weights, base_model="tiny", task_type="CAUSAL_LM")


def hand_delta(weight: LoraWeight) -> torch.Tensor:
    """s·B·A in float64 with the scale written out here, not taken from LoraWeight.scale."""
    r = weight.a.shape[0]
    s = weight.alpha / math.sqrt(r) if weight.use_rslora else weight.alpha / r
    return s * weight.b.double() @ weight.a.double()


def dense_sum(adapters: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    return sum(
        w * hand_delta(a.weights[name]) for a, w in zip(adapters, weights, strict=True) if name in a.weights
    )


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    error = float((actual.double() - expected.double()).norm() / expected.double().norm())
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"


def assert_optimal_truncation(actual: torch.Tensor, dense: torch.Tensor, rank: int, rtol: float) -> None:
    """``actual`` (the caller checks its factors' rank) is a best rank-``rank`` approximation of
    ``dense``: its error equals the Eckart–Young optimum ‖dense − [dense]_r‖_F = √(Σ_{i>r} σᵢ²),
    up to ``rtol``·‖dense‖_F.

    Comparing ``actual`` with one particular truncation instead would assume the truncation is
    unique, which fails (differently on different CPUs) when σ_r ≈ σ_{r+1}."""
    s = torch.linalg.svdvals(dense.double())
    error = float((actual.double() - dense.double()).norm())
    optimal = float(s[rank:].square().sum().sqrt())
    assert abs(error - optimal) <= rtol * float(s.norm()), f"error {error:.6g}, optimal {optimal:.6g}"


# ---- exact ------------------------------------------------------------------------------------


def test_exact_equals_dense_weighted_sum_with_mixed_ranks_alphas_rslora_and_negative_weights() -> None:
    adapters = [
        random_adapter(4, 8, seed=1),
        random_adapter(8, 4, seed=2),
        random_adapter(16, 16, rslora=True, seed=3),
    ]
    weights = [0.7, -1.3, 0.5]
    result = combine_adapters(adapters, CombineOptions(weights=tuple(weights)))
    for name, out in result.adapter.weights.items():
        assert out.rank == 28 and out.alpha == 28 and not out.use_rslora  # scale 1
        torch.testing.assert_close(
            out.delta().double(), dense_sum(adapters, weights, name), **TOL[torch.float32]
        )
    assert [m.energy_kept for m in result.modules] == [1.0] * len(SHAPES)


def test_rslora_scale_is_alpha_over_sqrt_r_not_alpha_over_r() -> None:
    adapter = random_adapter(16, 16, rslora=True, seed=4)  # rsLoRA scale 16/4 = 4; plain would be 1
    out = combine_adapters([adapter], CombineOptions()).adapter
    for name, weight in adapter.weights.items():
        expected = 4.0 * weight.b.double() @ weight.a.double()
        torch.testing.assert_close(out.weights[name].delta().double(), expected, **TOL[torch.float32])


def test_negative_weight_negates_one_factor_only() -> None:
    adapter = random_adapter(4, 8, seed=5)
    out = combine_adapters([adapter], CombineOptions(weights=(-1.0,))).adapter
    for name, weight in adapter.weights.items():
        assert torch.equal(out.weights[name].a, weight.a)  # A untouched
        torch.testing.assert_close(out.weights[name].b, -2.0 * weight.b)  # B carries −1 · alpha/r
        torch.testing.assert_close(
            out.weights[name].delta().double(), -hand_delta(weight), **TOL[torch.float32]
        )


def test_a_and_minus_a_cancel() -> None:
    adapter = random_adapter(4, 8, seed=6)
    out = combine_adapters([adapter, adapter], CombineOptions(weights=(1.0, -1.0))).adapter
    for name, weight in out.weights.items():  # cancels up to float32 rounding of the matmul
        assert float(weight.delta().abs().max()) <= 1e-6 * float(adapter.weights[name].delta().abs().max())


def test_modules_in_only_some_adapters_are_kept_with_their_weight() -> None:
    first = random_adapter(4, 4, seed=7, shapes={"x": (8, 8), "y": (8, 8)})
    second = random_adapter(2, 4, seed=8, shapes={"y": (8, 8), "z": (6, 8)})
    result = combine_adapters([first, second], CombineOptions(weights=(2.0, -0.5)))
    out = result.adapter.weights
    assert set(out) == {"x", "y", "z"}
    for name in out:
        expected = dense_sum([first, second], [2.0, -0.5], name)
        torch.testing.assert_close(out[name].delta().double(), expected, **TOL[torch.float32])
    assert {m.name: m.sources for m in result.modules} == {"x": [0], "y": [0, 1], "z": [1]}


def test_output_dtype_follows_inputs_and_can_be_asked_for() -> None:
    adapter = random_adapter(4, 8, seed=9)
    bf16 = Adapter(weights={n: w.to(torch.bfloat16) for n, w in adapter.weights.items()})
    assert all(
        w.dtype == torch.bfloat16 for w in combine_adapters([bf16], CombineOptions()).adapter.weights.values()
    )
    mixed = combine_adapters([bf16, adapter], CombineOptions()).adapter
    assert all(w.dtype == torch.float32 for w in mixed.weights.values())
    asked = combine_adapters([adapter], CombineOptions(dtype=torch.float16)).adapter
    assert all(w.dtype == torch.float16 for w in asked.weights.values())


# ---- svd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svd_equals_truncated_dense_svd_of_the_sum(rank: int) -> None:
    adapters = [random_adapter(4, 8, seed=10), random_adapter(8, 16, rslora=True, seed=11)]
    weights = [1.0, -0.6]
    result = combine_adapters(adapters, CombineOptions(weights=tuple(weights), rank=rank))
    for name, out in result.adapter.weights.items():
        s = torch.linalg.svdvals(dense_sum(adapters, weights, name))
        keep = min(rank, 12, *SHAPES[name])
        assert out.rank == keep and out.alpha == keep
        ours = torch.linalg.svdvals(out.delta().double())[:keep]
        # float32 factors vs the float64 dense sum: σ's to ~n·2⁻²⁴·σ₁, 1e-5 relative
        assert_rel_close(ours, s[:keep], 1e-5)
        # the same float32 bound
        assert_optimal_truncation(out.delta(), dense_sum(adapters, weights, name), keep, 1e-5)
        report = next(m for m in result.modules if m.name == name)
        # float32 σ's vs float64: ~1e-6 relative
        assert report.energy_kept == pytest.approx(
            float(s[:keep].square().sum() / s.square().sum()), rel=1e-5
        )


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_svd_energy_keeps_at_least_the_fraction_with_the_smallest_rank(fraction: float) -> None:
    adapters = [random_adapter(6, 6, seed=12), random_adapter(6, 3, seed=13)]
    result = combine_adapters(adapters, CombineOptions(energy=fraction))
    for name, out in result.adapter.weights.items():
        s2 = torch.linalg.svdvals(dense_sum(adapters, [1.0, 1.0], name)).square()
        kept = float(s2[: out.rank].sum() / s2.sum())
        assert kept >= fraction - 1e-6  # float32 energies
        assert out.rank == 1 or float(s2[: out.rank - 1].sum() / s2.sum()) < fraction


def test_svd_split_b_gives_orthonormal_rows_of_a() -> None:
    out = combine_adapters([random_adapter(4, 8, seed=14)], CombineOptions(rank=3, split="b")).adapter
    for weight in out.weights.values():
        # float32 QR: rows orthonormal to ~n·2⁻²⁴
        torch.testing.assert_close(weight.a @ weight.a.T, torch.eye(3), rtol=0, atol=1e-5)


# ---- ties and dare ----------------------------------------------------------------------------


def test_trim_keeps_the_largest_magnitudes() -> None:
    delta = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    torch.testing.assert_close(trim_magnitude(delta, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))


def test_ties_by_hand() -> None:
    deltas = torch.tensor([[[1.0, 4.0, -2.0]], [[3.0, -1.0, 0.5]], [[2.0, 6.0, 1.0]]])  # (3, 1, 3)
    merged = ties_merge(deltas, 0.67)  # keeps int(0.67 · 3) = 2 entries of each delta
    # trimmed: [0, 4, −2], [3, −1, 0], [2, 6, 0]; sums 5, 9, −2 elect +, +, −;
    # means of the agreeing entries: (3 + 2)/2, (4 + 6)/2, −2/1
    torch.testing.assert_close(merged, torch.tensor([[2.5, 5.0, -2.0]]))


def test_ties_matches_peft_merge_utils_for_equal_positive_weights() -> None:
    # PEFT elects signs before weighting, we after (so a negative weight negates a task);
    # with equal positive weights the two definitions agree
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    gen = torch.Generator().manual_seed(15)
    deltas = [torch.randn(12, 10, generator=gen) for _ in range(3)]
    weights = torch.tensor([0.7, 0.7, 0.7])
    expected = merge_utils.ties(deltas, weights, density=0.3)
    ours = ties_merge(torch.stack([w * d for w, d in zip(weights, deltas, strict=True)]), 0.3)
    torch.testing.assert_close(ours, expected)


def test_ties_with_a_negative_weight_negates_that_task() -> None:
    delta = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(27))
    torch.testing.assert_close(ties_merge(-delta, 0.4), -trim_magnitude(delta[0], 0.4))


def test_dare_keeps_a_density_fraction_rescaled_and_is_seeded() -> None:
    delta = torch.ones(1, 200, 100)

    def run(seed: int) -> torch.Tensor:
        return dare_merge(delta, 0.25, torch.Generator().manual_seed(seed))

    merged = run(0)
    assert set(merged.unique().tolist()) <= {0.0, 4.0}  # dropped, or rescaled by 1/density
    # 20 000 Bernoulli(0.25) draws: the kept fraction's std is √(0.25·0.75/20 000) ≈ 0.003; 0.02 ≈ 6.5σ
    assert abs(float((merged > 0).float().mean()) - 0.25) < 0.02
    assert torch.equal(merged, run(0)) and not torch.equal(merged, run(1))
    assert torch.equal(dare_merge(delta * 3, 1.0, torch.Generator()), delta[0] * 3)


def test_dare_is_unbiased() -> None:
    deltas = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(16))
    mean = torch.stack([dare_merge(deltas, 0.5, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(
        0
    )
    # each entry is a mean of 4000 draws with std ≤ |Δ| ~ 1: within 5σ/√4000 ≈ 0.08
    torch.testing.assert_close(mean, deltas.sum(0), rtol=0, atol=0.1)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_refactor_to_the_best_rank_r_approximation(method: str) -> None:
    adapters = [random_adapter(4, 8, seed=17), random_adapter(4, 8, seed=18)]
    options = CombineOptions(weights=(1.0, 0.5), method=method, density=0.4, rank=6, seed=3)  # type: ignore[arg-type]
    result = combine_adapters(adapters, options)
    again = combine_adapters(adapters, options)
    for name, out in result.adapter.weights.items():
        pairs = torch.stack([w * adapters[i].weights[name].delta() for i, w in enumerate((1.0, 0.5))])
        if method == "ties":
            merged = ties_merge(pairs, 0.4)
            s = torch.linalg.svdvals(merged.double())
            # dense float32 SVD of the TIES sum vs float64
            assert_rel_close(torch.linalg.svdvals(out.delta().double())[:6], s[:6], 1e-4)
        assert out.rank == 6
        torch.testing.assert_close(out.delta(), again.adapter.weights[name].delta())  # seeded


# ---- saved modules, conflicts, options ---------------------------------------------------------


def _with_saved(adapter: Adapter, tensor: torch.Tensor) -> Adapter:
    return Adapter(weights=adapter.weights, saved_modules={"lm_head.weight": tensor})


def test_saved_modules_kept_when_unweighted_and_identical() -> None:
    head = torch.randn(10, 4)
    a, b = _with_saved(random_adapter(2, 2, seed=19), head), _with_saved(random_adapter(2, 2, seed=20), head)
    result = combine_adapters([a, b], CombineOptions())
    assert torch.equal(result.adapter.saved_modules["lm_head.weight"], head)
    assert result.saved_kept == ["lm_head.weight"]


def test_saved_modules_refused_when_weighted_or_different_then_first_or_drop() -> None:
    a = _with_saved(random_adapter(2, 2, seed=21), torch.zeros(10, 4))
    b = _with_saved(random_adapter(2, 2, seed=22), torch.ones(10, 4))
    with pytest.raises(LoratoolsError, match="differs between adapter 1, adapter 2.*--saved-modules"):
        combine_adapters([a, b], CombineOptions())
    with pytest.raises(LoratoolsError, match="adapter 1 has weight -1"):
        combine_adapters([a], CombineOptions(weights=(-1.0,)))
    first = combine_adapters([a, b], CombineOptions(saved_modules="first"))
    assert torch.equal(first.adapter.saved_modules["lm_head.weight"], torch.zeros(10, 4))
    dropped = combine_adapters([a, b], CombineOptions(saved_modules="drop"))
    assert dict(dropped.adapter.saved_modules) == {} and dropped.saved_dropped == ["lm_head.weight"]


def test_shape_conflicts_are_all_listed() -> None:
    a = random_adapter(2, 2, seed=23, shapes={"p": (8, 8), "q": (8, 8), "r": (4, 4)})
    b = random_adapter(2, 2, seed=24, shapes={"p": (8, 6), "q": (6, 8), "r": (4, 4)})
    with pytest.raises(ShapeMismatch, match=r"2 module\(s\).*p \(a/ 8×8, b/ 8×6\).*q \(a/ 8×8, b/ 6×8\)"):
        combine_adapters([a, b], CombineOptions(), sources=["a/", "b/"])


def test_mixed_fan_in_fan_out_refused() -> None:
    a = random_adapter(2, 2, seed=25)
    b = Adapter(weights=random_adapter(2, 2, seed=26).weights, fan_in_fan_out=True)
    with pytest.raises(ShapeMismatch, match="fan_in_fan_out"):
        combine_adapters([a, b], CombineOptions())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 4, "energy": 0.9}, "not both"),
        ({"method": "exact", "rank": 4}, "keeps every rank"),
        ({"method": "svd"}, "needs -r"),
        ({"method": "ties", "rank": 4}, "needs --density"),
        ({"rank": 4, "density": 0.5}, "ties and dare"),
        ({"method": "dare", "rank": 4, "density": 1.5}, "density"),
        ({"rank": 0}, "at least 1"),
        ({"energy": 0.0}, "energy"),
        ({"weights": (1.0, math.nan)}, "finite"),
    ],
)
def test_options_refuse_bad_combinations(kwargs: dict, message: str) -> None:
    from loratools.errors import InvalidOptions  # a LoratoolsError: exit 1, not a usage error

    with pytest.raises(InvalidOptions, match=message):
        CombineOptions(**kwargs)


def test_default_method_and_weight_count() -> None:
    assert CombineOptions().method == "exact" and CombineOptions(rank=4).method == "svd"
    with pytest.raises(LoratoolsError, match="2 weights for 1 adapters"):
        combine_adapters([random_adapter(2, 2)], CombineOptions(weights=(1.0, 2.0)))


def test_provenance_records_the_recipe() -> None:
    a = Adapter(weights=random_adapter(2, 2).weights, provenance={"method": "extract"})
    out = combine_adapters([a], CombineOptions(weights=(0.5,), rank=2), sources=["x/"]).adapter
    assert out.provenance["method"] == "combine" and out.provenance["combine_method"] == "svd"
    assert out.provenance["weights"] == [0.5] and out.provenance["rank"] == 2
    assert out.provenance["inputs"] == [{"source": "x/", "provenance": {"method": "extract"}}]


# ---- properties -------------------------------------------------------------------------------

dims = st.integers(min_value=2, max_value=24)
ranks = st.integers(min_value=1, max_value=6)
weights_st = st.floats(min_value=-3, max_value=3, allow_nan=False).filter(lambda w: abs(w) > 0.05)


@settings(max_examples=30, deadline=None)
@given(
    d=dims, k=dims, r=st.lists(ranks, min_size=1, max_size=3), w=st.lists(weights_st, min_size=3, max_size=3),
    rslora=st.booleans(), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_property_exact_is_the_dense_sum(
    d: int, k: int, r: list[int], w: list[float], rslora: bool, seed: int
) -> None:
    adapters = [
        random_adapter(ri, 2.0 * ri + i, rslora=rslora, seed=seed + i, shapes={"m": (d, k)})
        for i, ri in enumerate(r)
    ]
    out = combine_adapters(adapters, CombineOptions(weights=tuple(w[: len(r)]))).adapter.weights["m"]
    expected = dense_sum(adapters, w[: len(r)], "m")
    # float32 stacked factors vs the float64 dense sum, atol scaled to the delta
    torch.testing.assert_close(
        out.delta().double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
    )


@settings(max_examples=30, deadline=None)
@given(
    d=dims, k=dims, r=st.lists(ranks, min_size=2, max_size=3), target=ranks, seed=st.integers(0, 10_000),
)  # fmt: skip
def test_property_svd_error_is_the_eckart_young_tail(
    d: int, k: int, r: list[int], target: int, seed: int
) -> None:
    adapters = [random_adapter(ri, ri, seed=seed + i, shapes={"m": (d, k)}) for i, ri in enumerate(r)]
    out = combine_adapters(adapters, CombineOptions(rank=target)).adapter.weights["m"]
    dense = dense_sum(adapters, [1.0] * len(r), "m")
    s = torch.linalg.svdvals(dense)
    tail = float(s[out.rank :].square().sum())
    error = float((dense - out.delta().double()).square().sum())
    assert out.rank == min(target, sum(r), d, k)
    # Eckart–Young; float32 rounding of the energy
    assert error == pytest.approx(tail, abs=1e-5 * float(s.square().sum()))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["svd", "dare"])
def test_cuda_gives_the_cpu_result(method: str) -> None:
    adapters = [random_adapter(4, 8, seed=28), random_adapter(6, 6, rslora=True, seed=29)]
    # dare: --energy takes the exact SVD (the randomized sketch differs between devices)
    truncation = {"energy": 0.9, "density": 0.5} if method == "dare" else {"rank": 3}
    options = {"weights": (1.0, -0.5), "method": method, **truncation}
    cpu = combine_adapters(adapters, CombineOptions(**options)).adapter  # type: ignore[arg-type]
    cuda = combine_adapters(adapters, CombineOptions(**options, device="cuda")).adapter  # type: ignore[arg-type]
    for name, weight in cpu.weights.items():
        assert cuda.weights[name].a.device.type == "cpu"  # results come back to the CPU
        assert_rel_close(cuda.weights[name].delta(), weight.delta(), 1e-4)


def test_a_registered_method_is_validated_dispatched_and_offered_by_the_cli() -> None:
    """A method is one Method plus a registry entry: options check it, combine runs it, the CLI lists it."""
    from loratools.cli.combine import combine as command
    from loratools.ops.combine.methods import METHODS, Method, register_method

    def first_only(name, pairs, options, dtype):  # keep the first adapter's module as it is
        b, a = pairs[0]
        return LoraWeight(a.to("cpu", dtype), b.to("cpu", dtype), float(a.shape[0])), 0.5

    method = Method("first", "the first adapter only", truncates=False, density=False, combine=first_only)
    register_method(method)
    try:
        with pytest.raises(LoratoolsError, match="--density applies to ties and dare"):
            CombineOptions(method="first", density=0.5)
        x, y = random_adapter(2, 2, seed=40), random_adapter(2, 2, seed=41)
        result = combine_adapters([x, y], CombineOptions(method="first"))
        assert result.summary()["min_energy_kept"] == 0.5
        for name, weight in result.adapter.weights.items():
            torch.testing.assert_close(weight.delta(), x.weights[name].delta())  # same factors: exact
    finally:
        del METHODS["first"]
    choices = next(p for p in command.params if p.name == "method").type.choices  # type: ignore[attr-defined]
    assert list(choices) == ["exact", "svd", "ties", "dare"] == list(METHODS)
