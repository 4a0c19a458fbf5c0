"""A bounds-checked walk over a GGUF file's header, before the ``gguf`` package reads it.

``gguf.GGUFReader`` trusts the lengths a file states: a string length of 2⁶² or a tensor past the
end of the file gives it short slices of its memory map, and a corrupt file can come out as a
model with no tensors. :func:`check_gguf` walks the same layout (llama.cpp's ``gguf.cpp`` rules)
checking every length, count, type and offset against the file's size, so that a file either
passes or is refused with one line. Its cost is one pass over the header (the tokenizer's
strings included), never over the tensor data.

Layout (little-endian): ``GGUF`` magic, version u32 (2 or 3), tensor count u64, key/value count
u64; each key/value: key string, type u32, value; each tensor: name string, n_dims u32, dims
u64 × n_dims (innermost first), ggml type u32, offset u64 (from the aligned start of the data);
strings are a u64 byte length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from loratools.errors import CheckpointError, UnknownFormat
from loratools.io.safetensors_file import bad_text, open_regular

__all__ = ["check_gguf", "open_gguf_reader"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays; real files use one level
MAX_ENTRIES = 100_000  # tensors or keys per file; real models hold at most a few thousand tensors
DEFAULT_ALIGNMENT = 32
# value type → byte size for the fixed-size scalar types (8 = string, 9 = array)
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
MIN_VALUE_SIZE = {**SCALAR_SIZE, STRING: 8, ARRAY: 12}
MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # empty name, one dim


class _Corrupt(Exception):
    """Raised inside the walk; turned into one CheckpointError naming the file."""


class _Walker:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buffer: mmap.mmap | bytes) -> None:
        self.buffer, self.pos, self.size = buffer, 0, len(buffer)

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise _Corrupt(f"{what} claims {n} bytes at byte {self.pos}, but only {self.remaining()} remain")
        data = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return bytes(data)

    def skip(self, n: int, what: str) -> None:
        """Step over ``n`` bytes without copying them (a large numeric array)."""
        if n > self.remaining():
            raise _Corrupt(f"{what} claims {n} bytes at byte {self.pos}, but only {self.remaining()} remain")
        self.pos += n

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def count(self, what: str, min_item: int) -> int:
        """A u64 count of items of at least ``min_item`` bytes each, bounded by what remains."""
        n = self.u64(what)
        if n * min_item > self.remaining():
            raise _Corrupt(f"{what} is {n}, more than the {self.remaining()} bytes left could hold")
        return n

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"the length of {what}"), what)

    def text(self, what: str) -> str:
        """A string that must be clean UTF-8 text (keys and tensor names)."""
        raw = self.string(what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} {raw[:40]!a} is not UTF-8") from None
        if bad_text(text):
            raise _Corrupt(f"{what} {text[:40]!a} holds control characters")
        return text

    def value(self, kind: int, key: str, depth: int = 0) -> int | None:
        """Skip one value of type ``kind``; returns a u32 value (for general.alignment)."""
        if kind == STRING:  # gguf decodes every string value as UTF-8 when it is read
            try:
                self.string(f"the string value of {key!a}").decode("utf-8")
            except UnicodeDecodeError:
                raise _Corrupt(f"a string value of {key!a} is not UTF-8") from None
        elif kind == ARRAY:
            if depth >= MAX_NESTING:
                raise _Corrupt(f"the value of {key!a} nests arrays more than {MAX_NESTING} deep")
            item = self.u32(f"the array type of {key!a}")
            if item not in MIN_VALUE_SIZE:
                raise _Corrupt(f"the array {key!a} has unknown element type {item}")
            n = self.count(f"the length of array {key!a}", MIN_VALUE_SIZE[item])
            if item in SCALAR_SIZE:
                self.skip(n * SCALAR_SIZE[item], f"array {key!a}")
            else:
                for _ in range(n):
                    self.value(item, key, depth + 1)
        elif kind in SCALAR_SIZE:
            data = self.take(SCALAR_SIZE[kind], f"the value of {key!a}")
            return int.from_bytes(data, "little") if kind == UINT32 else None
        else:
            raise _Corrupt(f"key {key!a} has unknown value type {kind}")
        return None


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id → (block size in elements, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): sizes for kind, sizes in GGML_QUANT_SIZES.items()}


def _header(walker: _Walker) -> tuple[int, int]:
    """Magic and version; returns (tensor count, key/value count)."""
    if walker.take(4, "the magic") != MAGIC:
        raise _Corrupt("it does not start with the GGUF magic")
    version = walker.u32("the version")
    if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
        raise UnknownFormat("a big-endian GGUF; only little-endian files are supported")
    if version not in VERSIONS:
        raise _Corrupt(f"GGUF version {version} is not one of {VERSIONS}")
    tensors = walker.count("the tensor count", MIN_TENSOR_INFO)
    kvs = walker.count("the key/value count", 8 + 4 + 1)
    if max(tensors, kvs) > MAX_ENTRIES:  # gguf reads each entry in Python: bound the work up front
        raise _Corrupt(
            f"it declares {tensors} tensors and {kvs} keys, more than any real file ({MAX_ENTRIES})"
        )
    return tensors, kvs


def _key_values(walker: _Walker, count: int) -> int:
    """Walk the key/values; returns the data alignment (``general.alignment``, default 32)."""
    alignment, seen = DEFAULT_ALIGNMENT, set()
    for _ in range(count):
        key = walker.text("a key")
        if key in seen:
            raise _Corrupt(f"key {key!a} appears twice")
        seen.add(key)
        kind = walker.u32(f"the type of {key!a}")
        value = walker.value(kind, key)
        if key == "general.alignment":
            if kind != UINT32 or value is None or value == 0 or value & (value - 1):
                raise _Corrupt(f"general.alignment must be a power-of-two u32, not {value} (type {kind})")
            alignment = value
    return alignment


def _tensor_infos(walker: _Walker, count: int) -> list[tuple[str, int, int]]:
    """Walk the tensor table; returns (name, offset, byte size) per tensor."""
    sizes, infos, names = _ggml_sizes(), [], set()
    for _ in range(count):
        name = walker.text("a tensor name")
        if name in names:
            raise _Corrupt(f"tensor {name!a} appears twice")
        names.add(name)
        n_dims = walker.u32(f"the dimension count of {name!a}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name!a} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [walker.u64(f"a dimension of {name!a}") for _ in range(n_dims)]
        kind = walker.u32(f"the type of {name!a}")
        if kind not in sizes:
            raise _Corrupt(f"tensor {name!a} has unknown ggml type {kind}")
        block, block_bytes = sizes[kind]
        elements = 1
        for n in dims:
            elements *= n
        if dims[0] % block or elements >= 2**62:
            raise _Corrupt(f"tensor {name!a} has impossible dimensions {dims} for its type")
        infos.append((name, walker.u64(f"the offset of {name!a}"), elements // block * block_bytes))
    return infos


def _check_data(infos: list[tuple[str, int, int]], data_start: int, alignment: int, size: int) -> None:
    """Tensors laid out one after the other from the aligned data start, each padded to the
    alignment (llama.cpp's rule), and inside the file."""
    expected = 0
    for name, offset, nbytes in infos:
        if offset != expected:
            raise _Corrupt(f"tensor {name!a} is at data offset {offset}, expected {expected}")
        if data_start + offset + nbytes > size:
            raise _Corrupt(
                f"tensor {name!a} ends at byte {data_start + offset + nbytes}, past the end ({size})"
            )
        expected = offset + nbytes + (-nbytes % alignment)


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file whose header does not describe a well-formed file of its size.

    Raises:
        CheckpointError: any length, count, type or offset that is impossible for the file.
        UnknownFormat: a big-endian GGUF.
    """
    with open_regular(path) as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CheckpointError(f"{path}: not a readable GGUF file (only {size} bytes); re-download it")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            walker = _Walker(buffer)
            try:
                tensors, kvs = _header(walker)
                alignment = _key_values(walker, kvs)
                infos = _tensor_infos(walker, tensors)
                data_start = walker.pos + (-walker.pos % alignment)
                _check_data(infos, data_start, alignment, size)
            except _Corrupt as exc:
                raise CheckpointError(
                    f"{path}: not a readable GGUF file ({exc}); re-download or re-export it"
                ) from None
            except UnknownFormat as exc:
                raise UnknownFormat(f"{path}: {exc}") from None


def open_gguf_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``, after :func:`check_gguf` has bounded its header.

    Raises:
        CheckpointError: a corrupt or truncated file.
        UnknownFormat: a big-endian GGUF.
        MissingExtra: the gguf package is not installed.
    """
    from loratools.io.gguf_io import _gguf

    gguf = _gguf()
    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({exc}); re-download or re-export it"
        ) from exc
