"""Our streaming .safetensors reader/writer against the safetensors library itself."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.errors import CheckpointError
from loratools.io.safetensors_file import DTYPES, SafetensorsFile, SafetensorsWriter, TensorSpec

ALL_DTYPES = sorted(DTYPES.values(), key=str)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), generator=gen, dtype=torch.uint8
    )
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_layout = a.dtype == b.dtype and a.shape == b.shape
    return same_layout and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_reads_what_safetensors_writes_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "a": sample(dtype, (3, 5), 1),
        "b.weight": sample(dtype, (7,), 2),
        "scalar": sample(dtype, (), 3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt", "k": "v"}
    for name, tensor in tensors.items():
        assert same_bits(st.read(name), tensor.contiguous())
        assert st.read_raw(name) == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_safetensors_reads_what_we_write_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"z": sample(dtype, (4, 2), 4), "a": sample(dtype, (0, 3), 5), "m": sample(dtype, (2, 2, 2), 6)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "y.safetensors", specs, {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(tmp_path / "y.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor)
    (length,) = struct.unpack("<Q", (tmp_path / "y.safetensors").read_bytes()[:8])
    assert length % 8 == 0


def test_writer_refuses_out_of_order_or_wrong_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = SafetensorsWriter(tmp_path / "z.safetensors", specs)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="is not"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before writing"):
        writer.close()


def write_valid(path: Path) -> bytes:
    save_file({"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:5], "shorter than its 8-byte header"),
        (lambda b: b[:20], "truncated inside its header"),
        (lambda b: b[:-10], "truncated: tensor 'w'"),
        (lambda b: struct.pack("<Q", 12) + b"not json at!" + b[8:], "header is not JSON"),
        (lambda b: struct.pack("<Q", 2**40) + b[8:], "implausible"),
        (lambda b: b"\x00" * 3 + b"garbage" * 20, "not a valid .safetensors"),
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path: Path, mangle, message: str) -> None:
    good = write_valid(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good))
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_header_entry_with_wrong_offsets_is_refused(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}'
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    with pytest.raises(CheckpointError, match="do not match its shape"):
        SafetensorsFile(path)
