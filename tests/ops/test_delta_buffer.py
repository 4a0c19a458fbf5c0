"""ΔW in reused buffers: the exact float32 difference, and the range finder's rounded copy of it."""

from __future__ import annotations

import pytest
import torch

from loratools.ops import delta as delta_module
from loratools.ops.delta import DeltaBuffer


def _pair(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).bfloat16()
    return (base.float() + 0.01 * torch.randn(shape, generator=gen)).bfloat16(), base


def test_delta_is_the_exact_float32_difference_whatever_the_buffer_held() -> None:
    buffer = DeltaBuffer(0, torch.device("cpu"))
    for seed, shape in enumerate([(30, 20), (8, 5), (40, 30)]):  # grows, shrinks, grows again
        ft, base = _pair(shape, seed)
        delta, total = buffer.delta("w", ft, base)
        # two bf16 values differ by an exact float32 (8-bit significands, close exponents)
        assert torch.equal(delta, ft.float() - base.float())
        assert total == pytest.approx(float(delta.double().square().sum()), rel=1e-6)  # float32 norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_range_copy_is_delta_rounded_to_the_range_dtype(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    monkeypatch.setattr(delta_module, "range_dtype", lambda device: dtype)
    buffer = DeltaBuffer(0, torch.device("cpu"))
    ft, base = _pair((30, 20), 0)
    delta, _ = buffer.delta("w", ft, base)
    copy = buffer.range_copy(delta)
    assert copy.dtype == dtype and copy.shape == delta.shape
    assert torch.equal(copy, delta.to(dtype))  # one rounding of the exact ΔW
    if dtype == torch.float32:
        assert copy is delta  # nothing to round: ΔW itself
    else:
        assert copy.untyped_storage().data_ptr() == buffer.stage.untyped_storage().data_ptr()  # reused
    assert torch.equal(delta, ft.float() - base.float())  # ΔW untouched by its copy
