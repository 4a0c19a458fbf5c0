"""One .safetensors file, read and written tensor by tensor with plain reads and writes.

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data. We read tensors with ``readinto`` into fresh buffers rather than through a memory map,
so resident memory is what the caller holds, not every page of the file it has touched.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from loratools.errors import CheckpointError

__all__ = ["DTYPES", "SafetensorsFile", "SafetensorsWriter", "TensorInfo", "TensorSpec"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be: name, shape and dtype (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor stored in a file: its spec plus where its bytes are."""

    file: Path
    begin: int  # absolute byte offsets in the file
    end: int


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid .safetensors file ({why}); re-download or re-save it")


class SafetensorsFile:
    """A parsed .safetensors header with on-demand tensor reads.

    Attributes:
        path: the file.
        metadata: the ``__metadata__`` strings.
        infos: tensor name → TensorInfo, in data-offset order.
        header: the raw bytes before the data (length prefix + JSON), for verbatim copies.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise _fail(self.path, "shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", prefix)
                if length > MAX_HEADER_BYTES:
                    raise _fail(self.path, f"header length {length} is implausible")
                raw = f.read(length)
            size = self.path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        if len(raw) < length:
            raise _fail(self.path, "truncated inside its header")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(self.path, f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise _fail(self.path, "header is not a JSON object")
        self.header = prefix + raw
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        start = 8 + length
        infos = [self._parse_entry(name, entry, start, size) for name, entry in header.items()]
        infos.sort(key=lambda info: info.begin)
        self.infos: dict[str, TensorInfo] = {info.name: info for info in infos}

    def _parse_entry(self, name: str, entry: object, start: int, size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise _fail(self.path, f"header entry for tensor {name!r} is not an object")
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(self.path, f"bad header entry for tensor {name!r}: {exc!r}") from None
        info = TensorInfo(name, shape, dtype, self.path, start + begin, start + end)
        if end < begin or info.end - info.begin != info.nbytes:
            raise _fail(self.path, f"tensor {name!r} has offsets that do not match its shape and dtype")
        if info.end > size:
            raise _fail(self.path, f"truncated: tensor {name!r} ends at byte {info.end} of {size}")
        return info

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into fresh memory."""
        info = self.infos[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with open(self.path, "rb") as f:
                f.seek(info.begin)
                if f.readinto(buffer.numpy().data) != info.nbytes:
                    raise _fail(self.path, f"truncated while reading tensor {name!r}")
        return buffer.view(info.dtype).reshape(info.shape)

    def read_raw(self, name: str) -> bytes:
        """One tensor's stored bytes, for copies that must not round-trip through floats."""
        info = self.infos[name]
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            return f.read(info.nbytes)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def encode_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header for tensors laid out in ``specs`` order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, in a planned order.

    The header is written first from the specs; each :meth:`write` must then deliver the next
    planned tensor with exactly its shape and dtype. Pass ``header`` to reuse a source file's
    header bytes verbatim (the specs must then be in that file's data order).
    """

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        header: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = specs
        self._next = 0
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 — closed in close()
        self._file.write(header if header is not None else encode_header(specs, metadata))

    @property
    def pending(self) -> list[TensorSpec]:
        return self._specs[self._next :]

    def write(self, name: str, tensor: torch.Tensor | bytes) -> None:
        """Append the next tensor (or its raw stored bytes)."""
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or spec.name != name:
            raise RuntimeError(f"{self.path}: expected tensor {spec and spec.name!r}, got {name!r}")
        if isinstance(tensor, bytes):
            data: bytes | memoryview = tensor
        else:
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise RuntimeError(f"{self.path}: tensor {name!r} is not {spec.shape} {spec.dtype}")
            data = _tensor_bytes(tensor)
        if len(data) != spec.nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} has {len(data)} bytes, not {spec.nbytes}")
        self._file.write(data)
        self._next += 1

    def abort(self) -> None:
        """Close without checking completeness (the caller discards the file)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            missing = [spec.name for spec in self.pending]
            raise RuntimeError(f"{self.path}: closed before writing {missing[:3]}…")
