"""ops/resize.py: truncation is the optimal one, energy and budget rules hold, PEFT configs round-trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.ops.resize import ResizeOptions, resize_adapter
from tests.ops.test_combine import assert_optimal_truncation, hand_delta, random_adapter
from tests.tolerances import TOL


def planted_weight(shape: tuple[int, int], spectrum: list[float], seed: int) -> LoraWeight:
    """A rank-len(spectrum) module whose delta has exactly these singular values (alpha = r)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], len(spectrum), generator=gen)).Q
    v = torch.linalg.qr(torch.randn(shape[1], len(spectrum), generator=gen)).Q
    s = torch.tensor(spectrum)
    return LoraWeight(v.T.contiguous(), (u * s).contiguous(), float(len(spectrum)))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_gives_the_truncated_dense_svd(rank: int) -> None:
    adapter = random_adapter(6, 12, rslora=True, seed=1)
    result = resize_adapter(adapter, ResizeOptions(rank=rank))
    for name, weight in adapter.weights.items():
        out = result.adapter.weights[name]
        s = torch.linalg.svdvals(hand_delta(weight))
        keep = min(rank, 6)
        assert out.rank == keep
        # float32 QR + small SVD vs float64 dense
        assert_optimal_truncation(out.delta(), hand_delta(weight), keep, 1e-5)
        report = next(m for m in result.modules if m.name == name)
        assert report.rank_before == 6 and report.rank == keep
        # float32 σ's vs float64: ~1e-6 relative
        assert report.energy_kept == pytest.approx(
            float(s[:keep].square().sum() / s.square().sum()), rel=1e-5
        )


def test_resized_modules_get_scale_one_and_untouched_ones_stay_bit_identical() -> None:
    adapter = Adapter(
        weights={
            "big": random_adapter(8, 16, rslora=True, seed=2, shapes={"m": (20, 12)}).weights["m"],
            "small": random_adapter(2, 7, seed=3, shapes={"m": (20, 12)}).weights["m"],
        }
    )
    out = resize_adapter(adapter, ResizeOptions(rank=4)).adapter.weights
    assert out["big"].rank == 4 and out["big"].alpha == 4 and not out["big"].use_rslora
    assert out["small"] is adapter.weights["small"]


@pytest.mark.parametrize("fraction", [0.3, 0.8, 0.95, 1.0])
def test_energy_keeps_at_least_the_fraction_with_the_smallest_rank(fraction: float) -> None:
    spectra = {"a": [3.0, 2.0, 1.0, 0.5], "b": [1.0, 1.0, 1.0, 1.0], "c": [5.0, 0.1, 0.01, 0.001]}
    adapter = Adapter(weights={n: planted_weight((16, 12), s, i) for i, (n, s) in enumerate(spectra.items())})
    result = resize_adapter(adapter, ResizeOptions(energy=fraction))
    for report in result.modules:
        s2 = torch.tensor(spectra[report.name], dtype=torch.float64).square()
        curve = (s2.cumsum(0) / s2.sum()).tolist()
        assert curve[report.rank - 1] >= fraction - 1e-6  # keeps at least F …
        assert report.rank == 1 or curve[report.rank - 2] < fraction  # … with the fewest ranks
        kept = resize_result_energy(adapter.weights[report.name], result.adapter.weights[report.name])
        assert kept == pytest.approx(report.energy_kept, abs=1e-5)  # float32 energies computed two ways
        assert kept >= fraction - 1e-5  # float32 energies


def resize_result_energy(before: LoraWeight, after: LoraWeight) -> float:
    """1 − ‖Δ − Δ'‖² / ‖Δ‖², measured on dense deltas (independent of the op's own report)."""
    dense = hand_delta(before)
    return 1.0 - float((dense - after.delta().double()).square().sum() / dense.square().sum())


def test_budget_keeps_the_largest_singular_values_model_wide() -> None:
    spectra = {"a": [4.0, 3.0, 0.2], "b": [2.5, 2.4, 2.3], "c": [1.0, 0.9, 0.05]}
    adapter = Adapter(weights={n: planted_weight((10, 9), s, i) for i, (n, s) in enumerate(spectra.items())})
    result = resize_adapter(adapter, ResizeOptions(budget=6))
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks == {"a": 2, "b": 3, "c": 1}  # 4, 3 | 2.5, 2.4, 2.3 | 1.0 (min_rank)
    assert sum(ranks.values()) == 6
    roomy = resize_adapter(adapter, ResizeOptions(budget=100))
    assert all(out is adapter.weights[n] for n, out in roomy.adapter.weights.items())


def test_budget_too_small_for_min_rank_is_a_clear_error() -> None:
    with pytest.raises(LoratoolsError, match="budget of 5 cannot give 3 modules rank 2"):
        resize_adapter(random_adapter(4, 4), ResizeOptions(budget=5, min_rank=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"rank": 2, "energy": 0.9}, "exactly one"),
        ({"rank": 0}, "at least 1"),
        ({"energy": 1.5}, r"\(0, 1\]"),
        ({"budget": 0}, "at least 1"),
        ({"budget": 4, "min_rank": 0}, "--min-rank"),
    ],
)
def test_options_refuse_bad_values(kwargs: dict, message: str) -> None:
    from loratools.errors import InvalidOptions  # a LoratoolsError: exit 1, not a usage error

    with pytest.raises(InvalidOptions, match=message):
        ResizeOptions(**kwargs)


def test_output_round_trips_through_peft_config_with_rank_and_alpha_patterns(tmp_path) -> None:
    spectra = {"a": [3.0, 2.0, 1.0, 0.5], "c": [5.0, 0.1, 0.01, 0.001]}
    weights = {n: planted_weight((16, 12), s, i) for i, (n, s) in enumerate(spectra.items())}
    weights["d"] = random_adapter(4, 16, rslora=True, seed=4, shapes={"m": (16, 12)}).weights["m"]
    adapter = Adapter(weights=weights, provenance={"method": "extract"})
    result = resize_adapter(adapter, ResizeOptions(energy=0.9))
    save_adapter(result.adapter, tmp_path / "out")
    loaded = load_adapter(tmp_path / "out")
    assert loaded.ranks == result.adapter.ranks and len(set(loaded.ranks.values())) > 1
    for name, weight in result.adapter.weights.items():
        torch.testing.assert_close(loaded.weights[name].delta(), weight.delta(), **TOL[torch.float32])
    assert loaded.provenance["method"] == "resize" and loaded.provenance["input"] == {"method": "extract"}


def test_dtype_is_kept_or_converted() -> None:
    adapter = Adapter(weights={n: w.to(torch.bfloat16) for n, w in random_adapter(4, 8).weights.items()})
    assert {w.dtype for w in resize_adapter(adapter, ResizeOptions(rank=2)).adapter.weights.values()} == {
        torch.bfloat16
    }
    asked = resize_adapter(adapter, ResizeOptions(rank=8, dtype=torch.float32)).adapter
    assert {w.dtype for w in asked.weights.values()} == {torch.float32}


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(2, 30), k=st.integers(2, 30), r=st.integers(1, 8), target=st.integers(1, 8),
    rslora=st.booleans(), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_property_resize_error_is_the_eckart_young_tail(
    d: int, k: int, r: int, target: int, rslora: bool, seed: int
) -> None:
    adapter = random_adapter(r, 3.0 * r, rslora=rslora, seed=seed, shapes={"m": (d, k)})
    result = resize_adapter(adapter, ResizeOptions(rank=target))
    dense = hand_delta(adapter.weights["m"])
    s = torch.linalg.svdvals(dense)
    kept = result.modules[0].rank
    assert kept == min(target, r, d, k)
    error = float((dense - result.adapter.weights["m"].delta().double()).square().sum())
    # Eckart–Young; float32 rounding of the energy
    assert error == pytest.approx(float(s[kept:].square().sum()), abs=1e-5 * float(s.square().sum()))
    # float32 rounding of the energy
    assert result.modules[0].energy_kept == pytest.approx(1 - error / float(s.square().sum()), abs=1e-5)
