"""FP8 checkpoints (DeepSeek-V3/Qwen3-FP8 block scales, per-tensor and per-channel scales): read as
float32, equal to the reference formula W = float32(weight) · scale; requantized within FP8's rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.errors import CheckpointError
from loratools.io.checkpoint import open_checkpoint
from loratools.io.quant import fp8


def reference_block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek-V3's weight_dequant, block by block in a loop (the obvious way, no broadcasting)."""
    out = torch.empty(weight.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j]
    return out


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_block_scales_equal_the_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    weight = torch.randn(300, 200).to(dtype)  # partial blocks on both axes
    scale_inv = torch.rand(3, 2) + 0.5
    save_file(
        {"l.weight": weight, "l.weight_scale_inv": scale_inv, "n.weight": torch.ones(3)},
        tmp_path / "m.safetensors",
    )
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert sorted(ckpt.names()) == ["l.weight", "n.weight"]
    # one float32 product per element on both sides: the same bits
    assert torch.equal(ckpt.get("l.weight"), reference_block_dequant(weight, scale_inv))


def test_per_tensor_and_per_channel_scales(tmp_path: Path) -> None:
    a, b = torch.randn(8, 16).to(torch.float8_e4m3fn), torch.randn(8, 16).to(torch.float8_e4m3fn)
    tensors = {"a.weight": a, "a.weight_scale": torch.tensor(0.25), "a.input_scale": torch.tensor(1.0)}
    tensors |= {"b.weight": b, "b.weight_scale": torch.rand(8, 1)}
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert sorted(ckpt.names()) == ["a.weight", "b.weight"]
    assert torch.equal(ckpt.get("a.weight"), a.float() * 0.25)
    assert torch.equal(ckpt.get("b.weight"), b.float() * tensors["b.weight_scale"])


def test_requantization_recomputes_block_scales(tmp_path: Path) -> None:
    save_file(
        {"l.weight": torch.randn(256, 384).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.ones(2, 3)},
        tmp_path / "m.safetensors",
    )
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    w = torch.randn(256, 384) * 3.0
    stored = fp8.quantize(ckpt.quantized["l.weight"], w, ckpt.read_stored)
    assert stored["l.weight"].dtype == torch.float8_e4m3fn and stored["l.weight_scale_inv"].shape == (2, 3)
    # every block's largest value lands on e4m3's largest finite value (448)
    assert torch.allclose(stored["l.weight_scale_inv"] * 448.0, fp8._block_amax(w, 128, 128))
    back = fp8.dequantize(ckpt.quantized["l.weight"], stored.__getitem__)
    # e4m3 keeps 3 mantissa bits: a rounding moves a value by at most 2⁻⁴ relative (normal range);
    # values below the block's subnormal threshold move by at most half a subnormal step (2⁻¹⁰ · scale)
    scale = fp8.expand(stored["l.weight_scale_inv"], (256, 384), (128, 128))
    assert bool(((back - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all())


def test_fp8_without_scale_is_refused(tmp_path: Path) -> None:
    save_file({"l.weight": torch.randn(4, 4).to(torch.float8_e4m3fn)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        open_checkpoint(tmp_path / "m.safetensors")
