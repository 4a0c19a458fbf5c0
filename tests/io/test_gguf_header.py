"""io/gguf_header.py: every length, count, type and offset in a GGUF header is bounded by the file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from loratools.errors import CheckpointError, UnknownFormat
from loratools.io.gguf_header import check_gguf, open_gguf_reader

gguf = pytest.importorskip("gguf")

F32 = 0  # ggml type ids
Q8_0 = 8


def string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def build(
    kvs: list[bytes] | None = None,
    tensors: list[tuple[bytes, list[int], int, int]] | None = None,
    data: bytes = b"",
    tensor_count: int | None = None,
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    """A GGUF file: header, key/values (already encoded), tensor infos (name, dims, type, offset),
    padding to ``alignment``, then ``data``."""
    kvs = (
        kvs
        if kvs is not None
        else [string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")]
    )
    tensors = tensors if tensors is not None else [(b"w", [4, 2], F32, 0)]
    count = len(tensors) if tensor_count is None else tensor_count
    parts = [b"GGUF" + struct.pack("<IQQ", version, count, len(kvs)), *kvs]
    for name, dims, kind, offset in tensors:
        parts.append(string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset))
    out = b"".join(parts)
    return out + bytes(-len(out) % alignment) + data


def write(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    return path


GOOD = {"data": bytes(32)}  # one 4×2 float32 tensor: 32 bytes


def test_the_builder_makes_files_gguf_reads(tmp_path: Path) -> None:
    reader = open_gguf_reader(write(tmp_path, build(**GOOD)))
    assert [t.name for t in reader.tensors] == ["w"] and reader.tensors[0].n_bytes == 32


def test_files_gguf_writes_pass(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_tensor("a", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("b", np.ones(7, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf(tmp_path / "w.gguf")


BAD = {
    "string length 2^62": (
        {"kvs": [string(b"general.name") + struct.pack("<IQ", 8, 2**62)], **GOOD},
        "claims",
    ),
    "value string longer than the file": (
        {"kvs": [string(b"k") + struct.pack("<I", 8) + struct.pack("<Q", 10_000) + b"abc"]},
        "claims 10000 bytes",
    ),
    "tensor count 2^40": ({"tensor_count": 2**40, **GOOD}, "the tensor count is 1099511627776"),
    "more tensors than any real file": (
        {"tensors": [(b"t%d" % i, [1], F32, 32 * i) for i in range(100_001)], "data": bytes(32 * 100_001)},
        "declares 100001 tensors",
    ),
    "array of 2^60 items": (
        {"kvs": [string(b"a") + struct.pack("<IIQ", 9, 4, 2**60)]},
        "the length of array 'a' is",
    ),
    "unknown value type": ({"kvs": [string(b"k") + struct.pack("<I", 99)]}, "unknown value type 99"),
    "tensor data past the end": ({"tensors": [(b"w", [4, 2], F32, 0)], "data": bytes(16)}, "past the end"),
    "tensor offset not where the last one ended": (
        {"tensors": [(b"w", [4, 2], F32, 64)], "data": bytes(96)},
        "at data offset 64, expected 0",
    ),
    "absurd dims": ({"tensors": [(b"w", [2**40, 2**40], F32, 0)], **GOOD}, "impossible dimensions"),
    "five dims": ({"tensors": [(b"w", [1, 1, 1, 1, 1], F32, 0)], **GOOD}, "5 dimensions"),
    "zero dims": ({"tensors": [(b"w", [], F32, 0)], **GOOD}, "0 dimensions"),
    "unknown ggml type": ({"tensors": [(b"w", [4, 2], 200, 0)], **GOOD}, "unknown ggml type 200"),
    "row not a whole block": ({"tensors": [(b"w", [16, 1], Q8_0, 0)], **GOOD}, "impossible dimensions"),
    "duplicate tensor": (
        {"tensors": [(b"w", [4], F32, 0), (b"w", [4], F32, 32)], "data": bytes(48)},
        "twice",
    ),
    "control characters in a name": ({"tensors": [(b"w\x1b[2J", [4, 2], F32, 0)], **GOOD}, "control"),
    "name not UTF-8": ({"tensors": [(b"w\xff", [4, 2], F32, 0)], **GOOD}, "not UTF-8"),
    "string value not UTF-8": (
        {"kvs": [string(b"k") + struct.pack("<I", 8) + string(b"\xff")], **GOOD},
        "UTF-8",
    ),
    "version 7": ({"version": 7, **GOOD}, "version 7"),
    "zero alignment": (
        {"kvs": [string(b"general.alignment") + struct.pack("<II", 4, 0)], **GOOD},
        "power-of-two",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_impossible_headers_are_one_clear_error(tmp_path: Path, case: str) -> None:
    kwargs, message = BAD[case]
    path = write(tmp_path, build(**kwargs))
    with pytest.raises(CheckpointError, match=message) as info:
        open_gguf_reader(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).isprintable()


def test_a_big_endian_file_is_named_as_such(tmp_path: Path) -> None:
    raw = build(**GOOD)
    path = write(tmp_path, raw[:4] + struct.pack(">I", 3) + raw[8:])
    with pytest.raises(UnknownFormat, match="big-endian"):
        check_gguf(path)


def test_convert_refuses_a_2_62_byte_string_instead_of_writing_an_empty_model(
    run_cli, tmp_path: Path
) -> None:
    kv = string(b"general.name") + struct.pack("<IQ", 8, 2**62)
    path = write(tmp_path, build(kvs=[kv], **GOOD))
    result = run_cli("convert", path, "--to", "safetensors", "-o", tmp_path / "out")
    assert (
        result.exit_code == 1
        and result.stderr.startswith("error:")
        and "not a readable GGUF" in result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.gguf")
    with pytest.raises(CheckpointError, match="not a regular file"):
        check_gguf(tmp_path / "f.gguf")


def test_inspect_refuses_a_2_62_byte_string_with_no_tensors(run_cli, tmp_path: Path) -> None:
    kv = string(b"general.name") + struct.pack("<IQ", 8, 2**62)
    path = write(tmp_path, build(kvs=[kv], tensors=[], tensor_count=0))
    result = run_cli("inspect", path)
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "GGUF" in result.stderr
