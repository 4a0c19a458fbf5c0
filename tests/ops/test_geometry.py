"""Magnitude/direction, rotation and intruder dimensions against dense float64 references.

Matrices are built from planted SVDs with well-separated singular values (gaps ≥ 1 on values of
order 10), so every singular vector compared here is unique up to sign, and float32 vectors are
within ~1e-5 of the float64 ones (error ≈ ε₃₂·‖W‖ / gap).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError
from loratools.ops.spectrum import SpectrumOptions, adapter_spectrum, delta_spectrum
from loratools.ops.spectrum.geometry import (
    GeometryOptions,
    MagnitudeDirection,
    direction_magnitude_correlation,
    intruders,
    magnitude_direction,
    module_geometry,
    rotation,
)
from tests.ops.test_spectrum import DictSource

OUT, IN = 48, 32
# rotation and intruders take W′'s top k from a randomized SVD (8 power iterations, 8 oversamples):
# its i-th vector is off by about (σ_{k+9}/σᵢ)^17; on these linearly decaying spectra (the slowest
# case) that stays ≤ 2e-3 for the k used here
ROTATION_TOL = 2e-3


def orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64)).Q


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(s) Vᵀ (float64) with s = 32, 31, …, 1: gaps of exactly 1."""
    u, v = orthonormal(OUT, IN, seed), orthonormal(IN, IN, seed + 1)
    s = torch.arange(IN, 0, -1, dtype=torch.float64)
    return u, s, v


def reference_similarities(w0: torch.Tensor, w_ft: torch.Tensor, k: int) -> torch.Tensor:
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U
    u_ft = torch.linalg.svd(w_ft.double(), full_matrices=False).U[:, :k]
    return (u0.T @ u_ft).abs().amax(dim=0)


def test_a_planted_new_direction_is_an_intruder_and_nothing_else_is() -> None:
    u, s, v = planted()
    w0 = u @ torch.diag(s) @ v.T
    # a new direction spread evenly over W0's 16 weakest left singular vectors: its best
    # similarity to any of them is 1/√16 = 0.25 < 0.5; given σ = 100 it becomes W′'s top direction
    new_u = u[:, -16:].sum(dim=1) / 4.0
    new_v = v[:, -16:].sum(dim=1) / 4.0
    w_ft = w0 + 100.0 * torch.outer(new_u, new_v)
    found = intruders(w0.float(), w_ft.float(), k=10, epsilon=0.5)
    expected = reference_similarities(w0, w_ft, 10)
    # absolute: cosines in [0, 1]
    torch.testing.assert_close(
        torch.tensor(found.similarities, dtype=torch.float64), expected, atol=ROTATION_TOL, rtol=0
    )
    assert found.ranks == [1]
    assert found.count == 1
    assert found.similarities[0] == pytest.approx(0.25, abs=0.05)  # mixing shifts it slightly
    assert found.to_dict()["singular_values"] == [found.singular_values[0]]


def test_rescaling_existing_directions_makes_no_intruders() -> None:
    u, s, v = planted(3)
    w0 = u @ torch.diag(s) @ v.T
    w_ft = u @ torch.diag(s * torch.linspace(1.5, 1.0, IN, dtype=torch.float64)) @ v.T
    found = intruders(w0.float(), w_ft.float(), k=10, epsilon=0.5)
    assert found.count == 0
    assert min(found.similarities) > 1 - ROTATION_TOL


def test_a_pure_magnitude_change_has_no_direction_change() -> None:
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    c = torch.rand(OUT, 1, generator=gen, dtype=torch.float64) + 0.5
    w_ft = c * w0  # every row rescaled, none turned
    got = magnitude_direction(w0.float(), w_ft.float())
    expected_m = float(((c.squeeze(1) - 1).abs() * w0.norm(dim=1)).mean())
    assert got.delta_m == pytest.approx(expected_m, rel=1e-5)  # float32 row norms: ~1e-7 relative
    assert abs(got.delta_d) < 1e-6  # 1 − cos of parallel rows in float32


@given(seed=st.integers(0, 2**16), angle=st.floats(0.05, 1.5))
@settings(max_examples=25, deadline=None)
def test_magnitude_direction_matches_float64(seed: int, angle: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    w_ft = w0 + angle * torch.randn(16, 12, generator=gen, dtype=torch.float64)
    got = magnitude_direction(w0.float(), w_ft.float())
    cos = torch.nn.functional.cosine_similarity(w0, w_ft, dim=1)
    # float32 row norms vs float64
    assert got.delta_m == pytest.approx(
        float((w_ft.norm(dim=1) - w0.norm(dim=1)).abs().mean()), rel=1e-4, abs=1e-6
    )
    assert got.delta_d == pytest.approx(float((1 - cos).mean()), rel=1e-3, abs=1e-6)  # 1 − cos cancels


def test_a_pure_rotation_keeps_the_spectrum_and_measures_the_turn() -> None:
    u, s, v = planted(7)
    w0 = u @ torch.diag(s) @ v.T
    q = orthonormal(OUT, OUT, 11)  # W′ = Q W0: same singular values, u′ᵢ = Q uᵢ
    w_ft = q @ w0
    got = rotation(w0.float(), w_ft.float(), k=5)
    assert max(abs(d) for d in got.sigma_change) < 1e-4 * float(s[0])  # float32 σ: ~1e-6 relative
    expected = (u[:, :5] * (q @ u[:, :5])).sum(dim=0).abs()
    # absolute: cosines in [0, 1]
    torch.testing.assert_close(
        torch.tensor(got.alignment, dtype=torch.float64), expected, atol=ROTATION_TOL, rtol=0
    )


def test_amplifying_a_direction_shows_as_spectral_shift_with_full_alignment() -> None:
    u, s, v = planted(13)
    gain = torch.ones(IN, dtype=torch.float64)
    gain[2] = 1.3  # σ₃ 30 → 39: now the top direction, with a gap of 7
    w0, w_ft = u @ torch.diag(s) @ v.T, u @ torch.diag(s * gain) @ v.T
    got = rotation(w0.float(), w_ft.float(), k=3)
    assert got.sigma_finetuned[0] == pytest.approx(39.0, rel=1e-5)  # float32 σ: ~1e-6 relative
    # float32 σ's of size ~30: ~1e-5
    assert got.sigma_change == pytest.approx([39 - 32, 32 - 31, 31 - 30], abs=1e-3)
    # u′₁ is u₃, so ⟨u′₁, u₁⟩ = 0: the order changed, the directions did not
    assert got.alignment[0] < ROTATION_TOL


def test_module_geometry_json_shape() -> None:
    u, s, v = planted()
    w0 = (u @ torch.diag(s) @ v.T).float()
    doc = module_geometry(w0, 1.1 * w0, GeometryOptions(geometry=True, intruders=True, k=4)).to_dict()
    assert set(doc) == {"magnitude_direction", "rotation", "intruders"}
    assert set(doc["magnitude_direction"]) == {"delta_m", "delta_d"}
    assert doc["rotation"]["k"] == 4 and len(doc["rotation"]["sigma_change"]) == 4
    assert len(doc["rotation"]["alignment"]) == 4
    assert {"k", "epsilon", "similarities", "count"} <= set(doc["intruders"])
    assert doc["intruders"]["count"] == 0
    cheap = module_geometry(w0, w0, GeometryOptions(geometry=True)).to_dict()
    assert "intruders" not in cheap


def test_correlation_sign() -> None:
    rising = [MagnitudeDirection(m, 2 * m + 1) for m in (0.1, 0.2, 0.4)]
    falling = [MagnitudeDirection(m, -m) for m in (0.1, 0.2, 0.4)]
    assert direction_magnitude_correlation(rising) == pytest.approx(1.0)
    assert direction_magnitude_correlation(falling) == pytest.approx(-1.0)
    assert direction_magnitude_correlation(rising[:2]) is None


@pytest.mark.parametrize("options", [{"k": 0}, {"epsilon": 0.0}, {"epsilon": 1.5}])
def test_bad_options_are_errors(options: dict[str, float]) -> None:
    with pytest.raises(LoratoolsError):
        GeometryOptions(**options)  # type: ignore[arg-type]


def test_checkpoint_pair_reports_geometry_per_module_and_the_correlation() -> None:
    u, s, v = planted()
    w0 = (u @ torch.diag(s) @ v.T).float()
    base = {f"layers.{i}.q_proj.weight": w0 for i in range(3)}
    tuned = {name: (1.0 + 0.1 * i) * w0 for i, name in enumerate(base)}  # magnitude only
    options = SpectrumOptions(top=4, geometry=GeometryOptions(geometry=True, intruders=True, k=3))
    report = delta_spectrum(DictSource(base), DictSource(tuned), options)
    doc = report.to_dict()
    first = doc["modules"][0]
    assert first["magnitude_direction"]["delta_d"] < 1e-6  # a pure rescaling turns no row
    assert first["intruders"]["count"] == 0
    assert first["rotation"]["k"] == 3
    assert doc["settings"]["intruder_k"] == 3
    assert doc["direction_magnitude_correlation"] is None  # ΔD is constant (zero): no correlation


def test_adapter_with_base_measures_w0_plus_the_update() -> None:
    u, s, v = planted()
    w0 = (u @ torch.diag(s) @ v.T).float()
    new_u = (u[:, -16:].sum(dim=1) / 4.0).float()
    new_v = (v[:, -16:].sum(dim=1) / 4.0).float()
    lora = LoraWeight(a=new_v[None, :] * 10.0, b=new_u[:, None] * 10.0, alpha=1.0)  # s·B·A = 100 u vᵀ
    adapter = Adapter(weights={"layers.0.q_proj": lora})
    options = SpectrumOptions(geometry=GeometryOptions(intruders=True, k=3))
    report = adapter_spectrum(adapter, options, base=DictSource({"layers.0.q_proj.weight": w0}))
    assert report.modules[0].geometry is not None
    found = report.modules[0].geometry.intruders
    assert found is not None and found.ranks == [1]
    with pytest.raises(LoratoolsError, match="--base"):
        adapter_spectrum(adapter, options)
