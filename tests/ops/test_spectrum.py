"""Spectra of adapters (factored) and of full fine-tunes (streamed ΔW): exactness and bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools import linalg
from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch
from loratools.io.adapter_dir import load_adapter
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.spectrum import (
    ModuleSpectrum,
    SpectrumOptions,
    adapter_spectrum,
    amplification,
    delta_spectrum,
    factored_singular_values,
    group_summary,
    layer_of,
    module_type,
    plan_delta,
)
from tests.tolerances import F64_MATH, TOL


class DictSource:
    """An in-memory stand-in for a Checkpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(shape=tuple(self.tensors[name].shape))

    def iter_tensors(self, names=None, prefetch=True):
        for name in self.tensors if names is None else names:
            yield name, self.tensors[name]


def _weight(d: int, k: int, r: int, seed: int, alpha: float = 16.0, rslora: bool = False) -> LoraWeight:
    gen = torch.Generator().manual_seed(seed)
    return LoraWeight(torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), alpha, rslora)


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**16))


# -- factored spectra ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(shapes, st.booleans())
def test_factored_singular_values_equal_dense(shape, rslora):
    d, k, r, seed = shape
    weight = _weight(d, k, r, seed, rslora=rslora)
    report = adapter_spectrum(Adapter({"m.q_proj": weight}))
    got = report.modules[0].singular_values
    dense = torch.linalg.svdvals(weight.delta().double())[: min(r, d, k)]
    assert got.shape == dense.shape
    # float32 factored SVD vs float64 dense: each σ off by ~n·2⁻²⁴·σ₁ (n ≤ 40: 2.4e-6·σ₁)
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5 * float(dense[0]))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_linalg_factored_svd_matches_dense_in_float64(shape):
    d, k, r, seed = shape
    gen = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(d, r, generator=gen, dtype=torch.float64),
        torch.randn(r, k, generator=gen, dtype=torch.float64),
    )
    svd = linalg.factored_svd(b, a)
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(b @ a)[: svd.rank], **TOL[torch.float64])
    torch.testing.assert_close((svd.u * svd.s) @ svd.vh, b @ a, **F64_MATH)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_values_only_path_matches_dense_in_float64(shape):
    d, k, r, seed = shape
    gen = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(d, r, generator=gen, dtype=torch.float64),
        torch.randn(r, k, generator=gen, dtype=torch.float64),
    )
    s = factored_singular_values(b, a)
    assert s.shape == (min(d, k, r),)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[: len(s)], **F64_MATH)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_stable_rank_between_one_and_rank(shape):
    d, k, r, seed = shape
    module = adapter_spectrum(Adapter({"m": _weight(d, k, r, seed)})).modules[0]
    # ‖Δ‖²/σ₁² lies in [1, rank] exactly; slack for float64 rounding (1e-9) and float32 σ's (1e-6)
    assert 1.0 - 1e-9 <= module.stable_rank <= min(r, d, k) + 1e-6


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_energy_fractions_and_effective_rank(shape, fraction):
    d, k, r, seed = shape
    module = adapter_spectrum(Adapter({"m": _weight(d, k, r, seed)})).modules[0]
    s2 = module.singular_values.square()
    for rank in range(1, len(s2) + 1):
        # float64 sums of ≤ 12 squares of the same σ's: rounding ~1e-15
        assert module.energy_at(rank) == pytest.approx(float(s2[:rank].sum() / s2.sum()), rel=1e-12)
    assert module.energy_at(len(s2)) == pytest.approx(1.0, abs=1e-12)  # e(n) = 1 up to float64 rounding
    assert module.energy_at(len(s2) + 5) == pytest.approx(1.0, abs=1e-12)  # complete: nothing beyond
    er = module.effective_rank(fraction)
    assert er is not None and 1 <= er <= len(s2)
    assert module.energy_at(er) >= fraction - 1e-12  # float64 rounding of the same sums
    if er > 1:
        assert module.energy_at(er - 1) < fraction
    doc = module.to_dict()
    assert list(doc["energy_at"]) == [str(2**i) for i in range(len(doc["energy_at"]))]
    assert 2 ** (len(doc["energy_at"]) - 1) <= len(s2) < 2 ** len(doc["energy_at"])


def test_truncated_spectrum_reports_unknown_instead_of_guessing():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # 14 of a total energy of 20
    module = ModuleSpectrum("m", (10, 10), s, energy=20.0, complete=False)
    assert module.energy_at(3) == pytest.approx(14 / 20)
    assert module.energy_at(4) is None
    assert module.effective_rank(0.5) == 2  # 13/20 ≥ 0.5
    assert module.effective_rank(0.9) is None  # 14/20 < 0.9: more than 3 values needed
    assert module.stable_rank == pytest.approx(20 / 9)


def test_rslora_and_alpha_scale_the_spectrum():
    weight = _weight(12, 9, 3, seed=1, alpha=6.0)
    plain = adapter_spectrum(Adapter({"m": weight})).modules[0].singular_values
    rs = (
        adapter_spectrum(Adapter({"m": LoraWeight(weight.a, weight.b, 6.0, True)})).modules[0].singular_values
    )
    torch.testing.assert_close(rs, plain * 3**0.5, rtol=1e-6, atol=0)  # alpha/√r vs alpha/r


# -- full fine-tunes ------------------------------------------------------------------------------
def test_checkpoint_pair_recovers_the_planted_spectrum(fixtures_dir: Path):
    planted = json.loads((fixtures_dir / "planted.json").read_text())
    base, tuned = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    report = delta_spectrum(base, tuned)
    assert sorted(m.name + ".weight" for m in report.modules) == sorted(planted["singular_values"])
    assert sorted(report.unchanged) == ["lm_head.weight", "model.embed_tokens.weight"]
    for module in report.modules:
        want = torch.tensor(planted["singular_values"][module.name + ".weight"], dtype=torch.float64)
        d, k = module.shape
        weyl = 3 * planted["noise_std"] * (d**0.5 + k**0.5)  # ‖noise‖₂ bounds each σ's shift
        torch.testing.assert_close(module.singular_values[:4], want, rtol=0, atol=weyl)
        assert float(module.singular_values[4]) < weyl  # nothing planted past rank 4
        assert module.complete and module.effective_rank(0.9) == 2 and module.effective_rank(0.99) == 4
    model = report.summary()["model"]
    assert model["uniform_rank"] == {"0.9": 2, "0.99": 4}


def test_checkpoint_energy_is_exact_and_randomized_top_matches_exact(fixtures_dir: Path):
    base, tuned = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    name = "model.layers.1.mlp.down_proj.weight"
    delta = tuned.get(name).double() - base.get(name).double()
    top = delta_spectrum(base, tuned, SpectrumOptions(top=6), names=[name]).modules[0]
    exact = delta_spectrum(base, tuned, SpectrumOptions(exact=True), names=[name]).modules[0]
    assert not top.complete and exact.complete and len(exact.singular_values) == min(delta.shape)
    # energy: a float32 reduction of ‖Δ‖² (√n·2⁻²⁴ ≈ 1e-6 relative) vs float64
    assert top.energy == pytest.approx(float(delta.square().sum()), rel=1e-5)
    # the planted values converge to 5 digits; the noise floor past them to the sketch's 1e-3 rtol
    torch.testing.assert_close(top.singular_values[:4], exact.singular_values[:4], rtol=1e-5, atol=0)
    # the noise floor past σ₄ has no gap: the sketch's accuracy
    torch.testing.assert_close(top.singular_values, exact.singular_values[:6], rtol=1e-3, atol=0)
    # top-4 σ's to 5 digits over the float32 energy
    assert top.energy_at(4) == pytest.approx(exact.energy_at(4), rel=1e-5)


def test_plan_delta_filters_skips_and_rejects_shape_changes():
    base = DictSource({"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(2, 2), "n": torch.zeros(5)})
    tuned = DictSource({"a.weight": torch.ones(3, 4), "c.weight": torch.ones(2, 2), "n": torch.ones(5)})
    assert plan_delta(base, tuned) == (["a.weight"], ["b.weight", "c.weight"])
    assert plan_delta(base, tuned, include=r"^c\.") == ([], ["c.weight"])
    with pytest.raises(ShapeMismatch, match="a.weight"):
        plan_delta(base, DictSource({"a.weight": torch.ones(4, 3)}))
    with pytest.raises(LoratoolsError, match="--include"):
        SpectrumOptions(include="(")
    with pytest.raises(LoratoolsError, match="--top"):
        SpectrumOptions(top=0)


# -- amplification (Section 7.3) ------------------------------------------------------------------
def test_amplification_matches_its_definition():
    weight = _weight(24, 16, 3, seed=3)
    w0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(4))
    svd = linalg.factored_svd(*weight.scaled_factors())
    amp = amplification(svd, w0)
    delta = weight.delta().double()
    u, _, vh = torch.linalg.svd(delta)
    projection = float(torch.linalg.matrix_norm(u[:, :3].T @ w0.double() @ vh[:3].T))
    # float32 projections Uᵀ·W0·V (sums of 64 terms) and float32 SVDs vs float64: ~1e-5, 10× slack
    assert amp.projection == pytest.approx(projection, rel=1e-4)
    # float32 σ's vs float64 ‖Δ‖_F
    assert amp.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
    assert amp.factor == pytest.approx(amp.delta_norm / projection, rel=1e-4)  # a ratio of the two above
    top3 = torch.linalg.svdvals(w0.double())[:3]
    # randomized top-3 of W0 vs exact float64 svdvals
    assert amp.base_projection == pytest.approx(float(top3.square().sum().sqrt()), rel=1e-4)
    assert amp.random_projection < amp.base_projection  # random directions see less of W0


def test_amplification_is_large_when_delta_avoids_w0():
    gen = torch.Generator().manual_seed(5)
    q_out = torch.linalg.qr(torch.randn(32, 32, generator=gen)).Q
    q_in = torch.linalg.qr(torch.randn(32, 32, generator=gen)).Q
    w0 = q_out[:, :8] @ torch.diag(torch.linspace(10, 1, 8)) @ q_in[:, :8].T + 1e-3 * q_out @ q_in.T
    along = linalg.factored_svd(q_out[:, :2], q_in[:, :2].T)  # Δ in W0's top directions
    across = linalg.factored_svd(q_out[:, 20:22], q_in[:, 20:22].T)  # Δ where W0 is ~0
    assert amplification(along, w0).factor < 0.2
    assert amplification(across, w0).factor > 100
    assert amplification(across, w0).factor > amplification(across, w0).random_factor


def test_adapter_spectrum_with_base(fixtures_dir: Path):
    adapter = load_adapter(fixtures_dir / "adapter")
    report = adapter_spectrum(adapter, base=open_checkpoint(fixtures_dir / "base"))
    assert [m.name for m in report.modules] == adapter.modules
    for module in report.modules:
        amp = module.amplification
        assert amp is not None and amp.rank == 4
        # both float64 sums of the same σ² in another order
        assert amp.delta_norm == pytest.approx(module.energy**0.5, rel=1e-6)
        assert amp.factor > 0 and amp.random_factor > 0


def test_adapter_spectrum_base_errors():
    adapter = Adapter({"layers.0.q_proj": _weight(6, 5, 2, seed=0)})
    with pytest.raises(MissingKeys):
        adapter_spectrum(adapter, base=DictSource({"layers.0.k_proj.weight": torch.zeros(6, 5)}))
    with pytest.raises(ShapeMismatch, match="q_proj"):
        adapter_spectrum(adapter, base=DictSource({"layers.0.q_proj.weight": torch.zeros(5, 6)}))
    transposed = Adapter(adapter.weights, fan_in_fan_out=True)  # GPT-2 Conv1D stores (in, out)
    report = adapter_spectrum(transposed, base=DictSource({"layers.0.q_proj.weight": torch.randn(5, 6)}))
    assert report.modules[0].amplification is not None


# -- summaries --------------------------------------------------------------------------------------
def test_names_group_by_type_and_layer():
    assert module_type("model.layers.11.self_attn.q_proj") == "q_proj"
    assert layer_of("model.layers.11.self_attn.q_proj") == "11"
    assert layer_of("lm_head") == "-"


def test_group_summary_pools_energy():
    big = ModuleSpectrum("l.0.q", (4, 4), torch.tensor([3.0, 1.0], dtype=torch.float64), 10.0, True)
    small = ModuleSpectrum("l.1.q", (4, 4), torch.tensor([1.0, 1.0], dtype=torch.float64), 2.0, True)
    doc = group_summary([big, small])
    assert doc["energy_at"]["1"] == pytest.approx((9 + 1) / 12)
    assert doc["energy_at"]["2"] == pytest.approx(1.0)
    assert doc["uniform_rank"] == {"0.9": 2, "0.99": 2}
    assert doc["total_rank"]["0.9"] == 3  # 9, then 1, 1: 11/12 ≥ 0.9 after three values
    assert doc["effective_rank_max"] == {"0.9": 2, "0.99": 2}
    assert doc["stable_rank_mean"] == pytest.approx((10 / 9 + 2) / 2)
    truncated = ModuleSpectrum("l.2.q", (9, 9), torch.tensor([1.0], dtype=torch.float64), 4.0, False)
    assert group_summary([big, truncated])["energy_at"] == {"1": pytest.approx(10 / 14), "2": None}
    assert group_summary([truncated])["uniform_rank"]["0.9"] is None


def test_report_summary_has_every_type_and_layer(fixtures_dir: Path):
    report = adapter_spectrum(load_adapter(fixtures_dir / "adapter"))
    summary = report.to_dict()["summary"]
    assert set(summary["by_type"]) == {"q_proj", "v_proj"}
    assert list(summary["by_layer"]) == ["0", "1"]
    assert summary["model"]["modules"] == 4


def test_untrained_adapter_with_zero_b_has_zero_rank():
    weight = LoraWeight(torch.randn(4, 10), torch.zeros(12, 4), alpha=8.0)  # PEFT's initialisation
    module = adapter_spectrum(Adapter({"m": weight})).modules[0]
    assert module.energy == 0.0 and module.stable_rank == 0.0
    assert module.effective_rank(0.9) == 0 and module.to_dict()["effective_rank"] == {"0.9": 0, "0.99": 0}


@pytest.mark.parametrize("base_name", ["base-sharded", "base-bf16"])
def test_sharded_and_bf16_bases_stream_the_same_pairs(fixtures_dir: Path, base_name: str):
    tuned = open_checkpoint(fixtures_dir / "finetuned")
    reference = delta_spectrum(open_checkpoint(fixtures_dir / "base"), tuned)
    report = delta_spectrum(open_checkpoint(fixtures_dir / base_name), tuned)
    by_name = {m.name: m for m in report.modules}
    if base_name == "base-bf16":  # rounding W_base to bf16 makes the untouched tensors differ too
        assert {"model.embed_tokens", "lm_head"} <= set(by_name)
        # bf16 noise ≈ 2⁻⁹·‖W‖ vs a trained change
        assert by_name["lm_head"].energy ** 0.5 < 0.05 * reference.modules[0].energy ** 0.5
    assert [n for n in by_name if ".layers." in n] == [m.name for m in reference.modules]
    # bf16 rounding of W_base (|W| ≈ 0.2, 2⁻⁹ relative) adds a small full-rank perturbation
    atol = 0.0 if base_name == "base-sharded" else 0.02
    for want in reference.modules:
        got = by_name[want.name]
        # absolute: see atol above
        torch.testing.assert_close(got.singular_values[:4], want.singular_values[:4], rtol=0, atol=atol)
