"""bitsandbytes checkpoints read as float32 weights: bit-equal to bitsandbytes' own dequantization,
auxiliary tensors hidden, and requantization equal to bitsandbytes' quantizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.io.checkpoint import open_checkpoint
from loratools.io.quant import bnb as qbnb

F = pytest.importorskip("bitsandbytes.functional")

CASES = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def bnb_4bit(w: torch.Tensor, quant_type: str, nested: bool, blocksize: int = 64):
    """bitsandbytes' own packing, as transformers saves a Linear4bit: weight + packed quant_state."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state, {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}


@pytest.fixture
def bnb_checkpoint(tmp_path: Path):
    """One 4-bit weight per (quant type, double quantization), one int8 weight, one plain norm.
    4800 elements: not a multiple of the nested block size (256·64), so partial blocks are read."""
    tensors, reference = {}, {}
    for i, (quant_type, nested) in enumerate(CASES):
        w = torch.randn(48, 100, dtype=torch.bfloat16)
        packed, state, parts = bnb_4bit(w, quant_type, nested)
        tensors[f"m{i}.weight"] = packed
        tensors.update({f"m{i}.{k}": v for k, v in parts.items()})
        reference[f"m{i}.weight"] = F.dequantize_4bit(packed, state)  # bf16, as bitsandbytes returns
    codes, scb, _ = F.int8_vectorwise_quant(torch.randn(16, 40).half())
    tensors |= {"lin.weight": codes, "lin.SCB": scb, "lin.weight_format": torch.tensor(0, dtype=torch.uint8)}
    reference["lin.weight"] = F.int8_vectorwise_dequant(codes, scb)
    tensors["norm.weight"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", reference


def test_reads_plain_names_and_hides_parts(bnb_checkpoint) -> None:
    path, _ = bnb_checkpoint
    ckpt = open_checkpoint(path)
    assert sorted(ckpt.names()) == sorted(["norm.weight", "lin.weight", *(f"m{i}.weight" for i in range(4))])
    assert ckpt.info("m0.weight").shape == (48, 100) and ckpt.info("m0.weight").dtype == torch.float32
    assert {g.kind for g in ckpt.quantized.values()} == {"bnb-nf4", "bnb-fp4", "bnb-int8"}
    assert "m1.weight.nested_absmax" in ckpt.stored and "m1.weight.nested_absmax" not in ckpt


def test_dequantization_is_bit_equal_to_bitsandbytes(bnb_checkpoint) -> None:
    path, reference = bnb_checkpoint
    ckpt = open_checkpoint(path)
    for name, expected in reference.items():
        got = ckpt.get(name)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        # bitsandbytes computes in float32 and casts once to its state's dtype: the same cast of ours
        # must give the same bits
        assert torch.equal(got.to(expected.dtype), expected), name


def test_float32_dequantization_equals_bitsandbytes_in_float32(tmp_path: Path) -> None:
    w = torch.randn(32, 64)  # a float32 state: bitsandbytes returns its float32 values uncast
    for quant_type, nested in CASES:
        packed, state, parts = bnb_4bit(w, quant_type, nested)
        save_file({"weight": packed, **parts}, tmp_path / "m.safetensors")
        assert torch.equal(
            open_checkpoint(tmp_path / "m.safetensors").get("weight"), F.dequantize_4bit(packed, state)
        )


@pytest.mark.parametrize(("quant_type", "nested"), CASES)
def test_requantization_matches_bitsandbytes(tmp_path: Path, quant_type: str, nested: bool) -> None:
    """Without double quantization our quantizer is bitsandbytes' (same codes, same absmax). With
    it, the stored nested_offset is kept (bitsandbytes would recompute the mean), so we check the
    round trip instead: bitsandbytes dequantizes our tensors to exactly what we read back."""
    w = torch.randn(32, 64)
    packed, _, parts = bnb_4bit(w, quant_type, nested)
    save_file({"weight": packed, **parts}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    group = ckpt.quantized["weight"]
    new_w = w + 0.3 * torch.randn_like(w)
    stored = qbnb.quantize(group, new_w, ckpt.read_stored)
    assert {k: (v.shape, v.dtype) for k, v in stored.items()} == {
        k: (ckpt.read_stored(k).shape, ckpt.read_stored(k).dtype) for k in group.parts
    }
    if not nested:
        expected, expected_state = F.quantize_4bit(new_w, blocksize=64, quant_type=quant_type)
        assert torch.equal(stored["weight"], expected) and torch.equal(
            stored["weight.absmax"], expected_state.absmax
        )
    new_state = F.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in stored.items() if k != "weight"}, torch.device("cpu")
    )
    assert torch.equal(
        F.dequantize_4bit(stored["weight"], new_state), qbnb.dequantize(group, stored.__getitem__)
    )


def test_int8_requantization_matches_bitsandbytes(bnb_checkpoint) -> None:
    ckpt = open_checkpoint(bnb_checkpoint[0])
    w = torch.randn(16, 40)
    stored = qbnb.quantize(ckpt.quantized["lin.weight"], w, ckpt.read_stored)
    codes, scb, _ = F.int8_vectorwise_quant(w)
    assert torch.equal(stored["lin.weight"], codes) and torch.equal(stored["lin.SCB"], scb)
