"""The merge precision report says what is lost of the update itself, and a merge never writes
NaN/Inf where the base was finite (ops/merge/update.py, ops/merge/precision.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import NonFiniteResult
from loratools.io.adapter_dir import save_adapter
from loratools.ops.merge import apply_update, delta_norm
from loratools.ops.merge.precision import MergeResult, precision_warnings
from tests.tolerances import BF16_ROUNDING

Q0 = "model.layers.0.self_attn.q_proj"


def planted(seed: int, d: int, k: int, relative: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 W0 (d, k) and rank-4 factors L (d, 4), R (4, k) with ‖L@R‖/‖W0‖ = ``relative``."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, k, generator=gen)
    left, right = torch.randn(d, 4, generator=gen), torch.randn(4, k, generator=gen)
    left *= relative * float(w0.norm()) / delta_norm(left, right)
    return w0, left, right


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_dtype_never_loses_more_than_the_whole_update(seed: int) -> None:
    """W0 is exact in its own dtype and round-to-nearest never lands farther from W0+Δ than W0
    is, so |round(W0+Δ) − W0 − Δ| ≤ |Δ| elementwise and lost_fraction ≤ 1 at every size of Δ."""
    for relative in (1e-5, 1e-3, 3e-3, 1e-1):
        w0, left, right = planted(seed, 128, 96, relative)
        for dtype in (torch.bfloat16, torch.float16):
            _, stats = apply_update("t", w0.to(dtype), left, right, dtype)
            assert stats.lost_fraction <= 1.0 + 1e-6  # 1e-6: the float32 norms' own rounding
            assert stats.base_rounding is None


def test_narrower_output_separates_the_base_cast_from_the_update() -> None:
    """A float32 base merged to bf16 with an update 20× below bf16's step: ‖round(W0+Δ) −
    round(W0) − Δ‖/‖Δ‖ is about 5 (rounding noise the base cast brings), but the update survives
    in the mean — W0's fractions are spread over the bf16 grid, so the rounding is unbiased."""
    w0, left, right = planted(4, 512, 512, 2e-4)  # 262 144 elements: κ's sampling error ≈ 1.5%
    out, stats = apply_update("t", w0, left, right, torch.bfloat16)
    delta = left @ right
    noise = float((out.float() - w0.bfloat16().float() - delta).norm() / delta.norm())
    assert noise > 3.0  # the old figure, hundreds of percent "lost"
    assert stats.lost_fraction < 0.1  # 0.1: κ is a mean over 2.6e5 noisy elements (std ≈ 0.015)
    cast = float((w0.bfloat16().float() - w0).norm() / delta.norm())
    assert stats.base_rounding == pytest.approx(cast, rel=1e-3)  # exact up to float32 norms
    assert stats.base_rounding > 5.0


def test_narrower_output_still_sees_an_update_that_vanishes() -> None:
    """A float32 base whose values already sit on the bf16 grid rounds deterministically: a tiny
    update rounds back to W0 and the report says it is lost."""
    w0, left, right = planted(5, 256, 256, 1e-5)
    _, stats = apply_update("t", w0.bfloat16().float(), left, right, torch.bfloat16)
    assert stats.lost_fraction > 0.9


def report_of(stats) -> MergeResult:
    return MergeResult("merge", [], "bfloat16", [stats], [], 0, [], [], 0.5)


def test_warnings_speak_of_the_change_to_the_weights() -> None:
    w0, left, right = planted(6, 64, 64, 1e-5)
    _, gone = apply_update("t", w0.bfloat16(), left, right, torch.bfloat16)
    (warning,) = precision_warnings(report_of(gone))
    assert warning.startswith("rounding to bfloat16 erases") and "--dtype float32" in warning
    assert "of the weights' size" in warning and "%" in warning
    w0, left, right = planted(4, 512, 512, 2e-4)
    _, noisy = apply_update("t", w0, left, right, torch.bfloat16)
    (warning,) = precision_warnings(report_of(noisy))
    assert warning.startswith("casting the base to bfloat16 moves its weights") and "kept" in warning
    assert json.loads(json.dumps(report_of(noisy).to_dict()))["precision"]["base_rounding"] > 5.0


def test_overflow_to_inf_is_refused_not_written() -> None:
    w0 = torch.full((8, 8), 6.0e4)  # float16 tops out at 65504
    left, right = torch.ones(8, 1) * 100.0, torch.ones(1, 8) * 100.0
    with pytest.raises(NonFiniteResult, match=r"t: the merged weight has 64 NaN/Inf value\(s\)"):
        apply_update("t", w0, left, right, torch.float16)
    out, _ = apply_update("t", w0, left, right, torch.float32)
    assert bool(torch.isfinite(out).all())


def test_non_finite_values_the_base_already_had_are_kept() -> None:
    w0 = torch.zeros(4, 4)
    w0[0, 0] = float("inf")
    out, _ = apply_update("t", w0, torch.ones(4, 1), torch.ones(1, 4), torch.float32)
    assert out[0, 0] == float("inf") and bool(torch.isfinite(out[1:]).all())


def test_cli_refuses_an_overflowing_float16_merge(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    """Finite factors with a huge alpha: W0 + Δ leaves float16's range; nothing is written."""
    gen = torch.Generator().manual_seed(0)
    weights = {Q0: LoraWeight(torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), 1e6)}
    save_adapter(Adapter(weights, base_model="fixtures/base"), tmp_path / "huge")
    out = tmp_path / "o"
    result = run_cli("merge", fixtures_dir / "base", tmp_path / "huge", "-o", out, "--dtype", "float16")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: model.layers.0.self_attn.q_proj.weight: the merged weight has")
    assert result.stderr.count("\n") == 1 and "float16's range" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".o*"))


@pytest.mark.parametrize("block_bytes", [64, 1000, 1 << 20])  # one row a block, ragged blocks, one block
def test_the_cpu_merge_in_row_blocks_is_the_whole_tensor_merge(
    monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """round(W0 + L@R) through cache-sized row blocks: the same values and record as one addmm."""
    from loratools.ops import delta
    from loratools.ops.merge import update

    monkeypatch.setattr(delta, "CPU_BLOCK_BYTES", block_bytes)  # rows_per_block's, shared with ΔW
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(37, 24, generator=gen).bfloat16()
    left, right = torch.randn(37, 6, generator=gen) * 0.1, torch.randn(6, 24, generator=gen)
    blocked, stats = apply_update("t", w0, left, right, torch.bfloat16, update.Scratch("cpu"))
    whole = w0.float().addmm_(left, right)
    # the blocks' float32 sums are the whole addmm's up to a BLAS kernel's summation order; one
    # rounding to bf16 of each (a different order may tip a tie: one bf16 ulp at most)
    torch.testing.assert_close(blocked.float(), whole, **BF16_ROUNDING)
    _, whole_stats = apply_update("t", w0, left, right, torch.bfloat16)  # no scratch: one whole addmm
    assert stats.delta_norm == whole_stats.delta_norm
    assert stats.lost_norm == pytest.approx(whole_stats.lost_norm, rel=1e-3, abs=1e-6)  # see above
