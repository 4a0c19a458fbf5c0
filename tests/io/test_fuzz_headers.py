"""Property-based fuzzing of the two header parsers that face untrusted files.

Valid files are generated, then mutated (JSON fields replaced by arbitrary values, entries
duplicated, offsets shifted, bytes overwritten, files truncated or extended). Whatever comes out,
the parser must either raise CheckpointError (UnknownFormat for a big-endian GGUF) or return a
description consistent with the file — never another exception, never a hang. For safetensors,
"consistent" is judged by the reference reader: whatever we accept, it accepts, with the same bytes.
Examples are bounded and derandomized (tests/conftest.py), so CI sees the same cases every run.
"""

from __future__ import annotations

import itertools
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loratools.errors import CheckpointError, UnknownFormat
from loratools.io.safetensors_file import DTYPES, SafetensorsFile

FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# ---- safetensors ---------------------------------------------------------------------------------

ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# mostly plain names (so that many files are accepted), sometimes any character but a surrogate
names = st.text(alphabet="ab._0é✓", max_size=6) | st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=4
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def safetensors_files(draw: st.DrawFn) -> tuple[dict, bytes]:
    """A valid header dict and data section: 1–4 tensors laid out in order."""
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    offset = 0
    for name in draw(st.lists(names, min_size=1, max_size=4, unique=True)):
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = ITEMSIZE[dtype]
        for n in shape:
            size *= n
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, draw(st.binary(min_size=offset, max_size=offset))


def encode(header: dict, data: bytes, duplicate: str | None, ascii_only: bool) -> bytes:
    raw = json.dumps(header, ensure_ascii=ascii_only).encode()  # escaped and raw UTF-8 names
    if duplicate is not None:  # repeat one entry's text: a JSON object with a repeated key
        entry = json.dumps({duplicate: header[duplicate]})[1:-1].encode()
        raw = raw[:-1] + b"," + entry + b"}"
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def mutated_safetensors(draw: st.DrawFn) -> bytes:
    header, data = draw(safetensors_files())
    tensors = [k for k in header if k != "__metadata__"]
    kind = draw(
        st.sampled_from(
            [
                "none",
                "field",
                "entry",
                "metadata",
                "shift",
                "duplicate",
                "bytes",
                "truncate",
                "extend",
                "length",
            ]
        )
    )
    duplicate = None
    if kind == "field" and tensors:  # one field of one entry replaced by anything
        name = draw(st.sampled_from(tensors))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(json_values)
    elif kind == "entry" and tensors:
        header[draw(st.sampled_from(tensors))] = draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "shift" and tensors:  # offsets moved: overlaps, gaps, past the end
        name = draw(st.sampled_from(tensors))
        delta = draw(st.integers(-8, 8))
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta, end + draw(st.sampled_from([0, delta]))]
    elif kind == "duplicate" and tensors:
        duplicate = draw(st.sampled_from(tensors))
    raw = encode(header, data, duplicate, draw(st.booleans()))
    if kind == "bytes":  # arbitrary bytes written over the header or the length prefix
        at = draw(st.integers(0, len(raw) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        raw = raw[:at] + patch + raw[at + len(patch) :]
    elif kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif kind == "extend":
        raw += draw(st.binary(min_size=1, max_size=9))
    elif kind == "length":
        raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    return raw


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def reference_tensors(path: Path) -> dict[str, bytes] | None:
    """What the safetensors library reads from ``path`` (raw bytes per tensor), or None."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: _bytes(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except Exception:  # the reference raises its own error kinds; a refusal is all we need
        return None


@FUZZ
@given(raw=mutated_safetensors())
def test_safetensors_header_fuzz(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        try:
            st_file = SafetensorsFile(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc) and str(exc).isprintable()
            return
        size = len(raw)
        position = len(st_file.header)
        for info in st_file.infos.values():  # in offset order, tiling the data exactly
            assert info.begin == position and info.end - info.begin == info.nbytes
            position = info.end
        assert position == size
        reference = reference_tensors(path)
        assert reference is not None, "we accepted a file the reference reader refuses"
        assert set(reference) == set(st_file.infos)
        for name in st_file.infos:
            assert st_file.read_raw(name) == reference[name]


# ---- GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """A small valid GGUF and the byte offsets of its u64 fields (lengths, counts, dims, offsets),
    where a mutation does the most damage."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_name("tiny")
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_float32("x.scale", 0.5)
    writer.add_tensor("blk.0.attn_q.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    positions = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        offset = field.offset
        for part in field.parts:
            if part.dtype == np.uint64:
                positions.extend(offset + 8 * i for i in range(part.size))
            offset += part.nbytes
    return path.read_bytes(), positions


@st.composite
def gguf_mutations(draw: st.DrawFn) -> tuple[str, int, bytes]:
    """(kind, where, bytes): for the u64 kinds ``where`` picks one of the base's u64 fields."""
    kind = draw(st.sampled_from(["bytes", "u64", "u64, no tensors", "u32", "truncate", "extend"]))
    at = draw(st.integers(0, 400))  # the header of the base file is ~300 bytes
    if kind.startswith("u64"):  # a length/count/dim/offset replaced by a large or small value
        value = draw(
            st.sampled_from([0, 1, 7, 2**31, 2**32 + 1, 2**40, 2**62, 2**64 - 1]) | st.integers(0, 300)
        )
        return kind, at, struct.pack("<Q", value)
    if kind == "u32":
        return kind, at, struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    return kind, at, draw(st.binary(min_size=1, max_size=6))


def assert_lengths_match(parts: list) -> None:
    """Inside a GGUF field, a u64 directly followed by a u8 array is that array's stated length
    (strings, u8 arrays): a reader that ran past the file would hold fewer bytes than stated."""
    import numpy as np

    for length, data in itertools.pairwise(parts):
        if length.dtype == np.uint64 and length.size == 1 and data.dtype == np.uint8:
            assert int(length[0]) == data.size


@FUZZ
@given(mutation=gguf_mutations())
def test_gguf_reader_fuzz(gguf_base: tuple[bytes, list[int]], mutation: tuple[str, int, bytes]) -> None:
    from loratools.io.gguf_header import open_gguf_reader
    from loratools.io.gguf_io import read_gguf_kv

    base, positions = gguf_base
    kind, at, patch = mutation
    at = positions[at % len(positions)] if kind.startswith("u64") else min(at, len(base) - 1)
    if kind == "truncate":
        raw = base[:at]
    elif kind == "extend":
        raw = base + patch
    else:
        raw = base[:at] + patch + base[at + len(patch) :]
    if kind == "u64, no tensors":  # a file whose key/values are all there is to read
        raw = raw[:8] + struct.pack("<Q", 0) + raw[16:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        path.write_bytes(raw)
        try:
            reader = open_gguf_reader(path)
            read_gguf_kv(reader)
        except (CheckpointError, UnknownFormat) as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        declared, kvs = struct.unpack("<QQ", raw[8:24])
        assert len(reader.tensors) == declared and len(reader.fields) == 3 + kvs  # + GGUF.* counters
        assert reader.data_offset <= len(raw)  # the header was read inside the file, not past it
        for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
            assert_lengths_match(field.parts)
        for t in reader.tensors:  # every tensor's bytes inside the file
            assert t.data_offset >= 0 and t.data_offset + t.n_bytes <= len(raw)
            assert t.data.nbytes == t.n_bytes
        del reader
