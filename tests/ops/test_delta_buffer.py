"""ΔW in reused buffers: the exact float32 difference, its norm, and the range finder's rounded copy."""

from __future__ import annotations

import pytest
import torch

from loratools.errors import LoratoolsError
from loratools.ops import delta as delta_module
from loratools.ops.delta import DeltaBuffer


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).bfloat16()
    return (base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16(), base


@pytest.mark.parametrize("block_bytes", [64, 1000, 1 << 20])  # many blocks, a ragged last one, one block
def test_delta_is_the_exact_float32_difference_whatever_the_buffer_held(monkeypatch, block_bytes) -> None:
    monkeypatch.setattr(delta_module, "CPU_BLOCK_BYTES", block_bytes)
    buffer = DeltaBuffer(0, torch.device("cpu"))
    for seed, shape in enumerate([(30, 20), (8, 5), (3, 7, 6), (40, 30), (17,)]):  # grows, shrinks, 3-D, 1-D
        ft, base = _pair(shape, seed)
        delta, total = buffer.delta("w", ft, base)
        # two bf16 values differ by an exact float32 (8-bit significands, close exponents)
        assert torch.equal(delta, ft.float() - base.float())
        # per-block float32 norms summed in float64 against one float64 sum: float32 rounding
        assert total == pytest.approx(float(delta.double().square().sum()), rel=1e-6)
        assert buffer.rounded(delta) is delta  # no rounding asked


@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_rounded_copy_is_delta_rounded_once(monkeypatch, block_bytes) -> None:
    monkeypatch.setattr(delta_module, "CPU_BLOCK_BYTES", block_bytes)
    buffer = DeltaBuffer(0, torch.device("cpu"), rounded=torch.bfloat16)
    for seed, shape in enumerate([(30, 20), (8, 5)]):
        ft, base = _pair(shape, seed)
        delta, _ = buffer.delta("w", ft, base)
        copy = buffer.rounded(delta)
        assert copy.dtype == torch.bfloat16 and copy.shape == delta.shape
        assert torch.equal(copy, delta.bfloat16())  # one rounding of the exact ΔW
        assert torch.equal(delta, ft.float() - base.float())  # ΔW untouched by its copy


def test_float32_rounding_is_no_copy() -> None:
    buffer = DeltaBuffer(100, torch.device("cpu"), rounded=torch.float32)
    ft, base = _pair((10, 10), 0)
    delta, _ = buffer.delta("w", ft, base)
    assert buffer.rounded(delta) is delta


def test_nan_in_delta_is_an_error_naming_the_tensor() -> None:
    buffer = DeltaBuffer(0, torch.device("cpu"))
    ft, base = _pair((4, 4), 0)
    ft[1, 2] = float("nan")
    with pytest.raises(LoratoolsError, match="layers.0.q_proj.weight"):
        buffer.delta("layers.0.q_proj.weight", ft, base)
