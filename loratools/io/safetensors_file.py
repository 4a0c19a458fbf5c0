"""One .safetensors file, read and written tensor by tensor with plain reads and writes.

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data. We read tensors with ``readinto`` into our own buffers rather than through a memory map,
so resident memory is what the caller holds, not every page of the file it has touched. Streaming
passes read into a :class:`~loratools.io.buffers.BufferRing`, so the kernel does not fault in fresh zeroed pages
for every tensor (profiled: that was most of a merge's system time).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import stat
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from loratools.errors import CheckpointError
from loratools.io.buffers import BufferRing
from loratools.io.cache import WriteBehind, drop_cached

__all__ = ["DTYPES", "SafetensorsFile", "SafetensorsWriter", "StoredRange", "TensorInfo", "TensorSpec"]

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
# Real single files hold at most a few thousand tensors (a large model's shard, an SDXL LyCORIS);
# a header declaring far more is corrupt or hostile, and parsing it costs ~1 KB of memory and ~10 µs
# per entry, so it is refused before its JSON is parsed.
MAX_TENSORS = 100_000


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


@dataclass(frozen=True)
class StoredRange:
    """A tensor's stored bytes left where they are: ``path[begin:end]``. A writer copies them
    file to file in the kernel (``copy_file_range``), so they never pass through user memory."""

    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid .safetensors file ({why}); re-download or re-save it")


def open_regular(path: Path) -> io.BufferedReader:
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO or a device would
    block or never end). The check is on the opened descriptor, so it cannot be raced.

    Raises:
        CheckpointError: not a regular file, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file (a pipe, device or socket); pass a weights file")
    return os.fdopen(fd, "rb")


def bad_text(text: str) -> bool:
    """True for strings no checkpoint name should hold: control characters (which would drive a
    terminal when printed) or lone surrogates (not valid Unicode, refused by safetensors)."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


class DuplicateKey(ValueError):
    """A JSON object with a repeated key (its first argument)."""


def unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` object_pairs_hook refusing repeated keys (plain ``json`` keeps the last silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        names = [key for key, _ in pairs]
        raise DuplicateKey(next(key for i, key in enumerate(names) if key in names[:i]))
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    """The header JSON, strictly: UTF-8, an object, no repeated keys, no NaN/Infinity."""
    try:
        header = json.loads(raw, object_pairs_hook=unique_object, parse_constant=_no_constant)
    except DuplicateKey as exc:
        raise _fail(path, f"the header names {exc.args[0]!a} twice") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"header is not JSON: {str(exc)!a}") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    """``__metadata__``: absent/null or an object of strings (what safetensors accepts)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"__metadata__ is a {type(value).__name__}, not an object of strings")
    for key, text in value.items():
        if not isinstance(text, str):
            raise _fail(path, f"__metadata__ value for {key!a} is a {type(text).__name__}, not a string")
        if any(unicodedata.category(c) == "Cs" for c in key + text):
            raise _fail(path, f"__metadata__ entry {key!a} holds a lone surrogate (not valid Unicode)")
    return value  # type: ignore[return-value]


def _short(value: object, limit: int = 60) -> str:
    """``value`` as ASCII (never raw control characters), cut to ``limit`` characters."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


U64_MAX = 2**64 - 1  # sizes and offsets are u64 in the reference reader


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def _overflows(shape: list[int], itemsize: int) -> bool:
    """The reference reader multiplies the dims in order with overflow checks (then × item size):
    a running product past u64 is refused even when a later dim is 0."""
    count = 1
    for n in shape:
        count *= n
        if count > U64_MAX:
            return True
    return count * itemsize > U64_MAX


def _parse_entry(path: Path, name: str, entry: object, start: int) -> TensorInfo:
    """One tensor's header entry → TensorInfo (absolute offsets), checking types and sizes."""
    if bad_text(name):
        raise _fail(path, f"tensor name {name!a} holds control characters or lone surrogates")
    if not isinstance(entry, dict):
        raise _fail(path, f"header entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has dtype {_short(dtype)}, not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _fail(path, f"tensor {name!r} has shape {_short(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _fail(
            path, f"tensor {name!r} has data_offsets {_short(offsets)}, not [begin, end] byte offsets"
        )
    if _overflows(shape, DTYPES[dtype].itemsize):
        raise _fail(path, f"tensor {name!r} has shape {_short(shape)}, too large to address")
    begin, end = offsets
    info = TensorInfo(name, tuple(shape), DTYPES[dtype], path, start + begin, start + end)
    if end < begin or end - begin != info.nbytes:
        raise _fail(path, f"tensor {name!r} has offsets that do not match its shape and dtype")
    return info


def _check_count(path: Path, count: int) -> None:
    if count > MAX_TENSORS:
        raise _fail(
            path, f"its header declares {count} tensors, more than any real file (limit {MAX_TENSORS})"
        )


def _check_layout(path: Path, infos: list[TensorInfo], start: int, size: int) -> None:
    """Tensors (sorted by offset) must tile the data section exactly: no overlap, no gap, no
    trailing bytes — the reference reader refuses anything else."""
    position = start
    for info in infos:
        if info.begin != position:
            what = "overlaps the tensor before it" if info.begin < position else "leaves a gap before it"
            raise _fail(path, f"tensor {info.name!r} at bytes {info.begin}–{info.end} {what}")
        position = info.end
    if position > size:
        raise _fail(path, f"truncated: its tensors end at byte {position} of {size}")
    if position < size:
        raise _fail(path, f"{size - position} bytes after the last tensor belong to no tensor")


class SafetensorsFile:
    """A parsed, validated .safetensors header with on-demand tensor reads.

    The header is held to the reference reader's rules (``_check_layout``, ``_parse_entry``), so
    whatever loratools accepts — and copies into its outputs — the safetensors library accepts too.

    Attributes:
        path: the file.
        metadata: the ``__metadata__`` strings.
        infos: tensor name → TensorInfo, in data-offset order.
        header: the raw bytes before the data (length prefix + JSON), for verbatim copies.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open_regular(self.path) as f:
            try:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise _fail(self.path, "shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", prefix)
                if length > MAX_HEADER_BYTES:
                    raise _fail(self.path, f"header length {length} is implausible")
                if 8 + length > size:
                    raise _fail(
                        self.path, f"truncated inside its header ({length} bytes claimed, file {size})"
                    )
                raw = f.read(length)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        if len(raw) < length:
            raise _fail(self.path, "truncated inside its header")
        _check_count(self.path, raw.count(b'"data_offsets"'))  # cheap: before parsing the JSON
        header = _parse_json(self.path, raw)
        _check_count(self.path, len(header) - ("__metadata__" in header))
        self.header = prefix + raw
        self.metadata: dict[str, str] = dict(_parse_metadata(self.path, header.pop("__metadata__", None)))
        start = 8 + length
        infos = self._parse_entries(header, start, size - start)
        infos.sort(key=lambda info: (info.begin, info.end))
        _check_layout(self.path, infos, start, size)
        self.infos: dict[str, TensorInfo] = {info.name: info for info in infos}

    def _parse_entries(self, header: dict[str, object], start: int, data_bytes: int) -> list[TensorInfo]:
        """Every tensor entry, failing as soon as they claim more bytes than the data section has
        (a header listing a million overlapping tensors fails at the first one too many)."""
        infos, claimed = [], 0
        for name, entry in header.items():
            info = _parse_entry(self.path, name, entry, start)
            claimed += info.nbytes
            if claimed > data_bytes:
                why = f"its tensors claim more than the {data_bytes} bytes after the header, at {name!r}"
                raise _fail(self.path, f"truncated or corrupt: {why}")
            infos.append(info)
        return infos

    def read(
        self, name: str, buffers: BufferRing | None = None, *, drop_behind: bool = False
    ) -> torch.Tensor:
        """Load one tensor into fresh memory, or into a free buffer of ``buffers``.

        ``drop_behind``: then drop the bytes read from the page cache (a pass over more than the
        cache can hold: see :meth:`loratools.io.checkpoint.Checkpoint.iter_tensors`).
        """
        info = self.infos[name]
        buffer = (
            buffers.take(info.nbytes) if buffers is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        )
        if info.nbytes:
            with open_regular(self.path) as f:
                f.seek(info.begin)
                if f.readinto(buffer.numpy().data) != info.nbytes:
                    raise _fail(self.path, f"truncated while reading tensor {name!r}")
                if drop_behind:
                    drop_cached(f.fileno(), info.begin, info.nbytes)
        return buffer.view(info.dtype).reshape(info.shape)

    def read_raw(self, name: str) -> bytes:
        """One tensor's stored bytes, for copies that must not round-trip through floats."""
        info = self.infos[name]
        with open_regular(self.path) as f:
            f.seek(info.begin)
            data = f.read(info.nbytes)
        if len(data) != info.nbytes:
            raise _fail(self.path, f"truncated while reading tensor {name!r}")
        return data

    def stored_range(self, name: str) -> StoredRange:
        """Where one tensor's bytes are, for a writer to copy them without reading them here."""
        info = self.infos[name]
        return StoredRange(self.path, info.begin, info.end)


# copy_file_range's errors meaning "not here" (old kernel, other file system, special file):
# the copy then goes through user space, as it would without the call
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}
_COPY_CHUNK = 64 << 20  # user-space fallback: one reused buffer, not a copy of the whole tensor


def copy_range(source: StoredRange, destination: BinaryIO) -> None:
    """Append ``source``'s bytes to ``destination`` (an open, binary, buffered file).

    ``os.copy_file_range`` moves them inside the kernel: no read buffer to fault in, no copy
    to and from user space (and a shared extent on file systems with reflinks). Where the call
    is missing or refused, a plain read/write loop through one reused buffer does the same.

    Raises:
        CheckpointError: the source ended before ``source.end`` (truncated since it was opened).
    """
    destination.flush()  # the kernel copy writes at the descriptor's offset: buffered bytes go first
    position = destination.tell()
    with open_regular(source.path) as f:
        done = _kernel_copy(f.fileno(), destination.fileno(), source, position)
        if done < source.nbytes:
            destination.seek(position + done)
            _user_copy(f, destination, source, done)
    destination.seek(position + source.nbytes)


def _kernel_copy(fd_in: int, fd_out: int, source: StoredRange, position: int) -> int:
    """Bytes copied with ``copy_file_range`` (0 where it is unavailable)."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    while copy is not None and done < source.nbytes:
        try:
            n = copy(fd_in, fd_out, source.nbytes - done, source.begin + done, position + done)
        except OSError as exc:
            if exc.errno in _NO_KERNEL_COPY:
                break
            raise
        if n == 0:
            raise _fail(source.path, f"truncated: ends before byte {source.end}")
        done += n
    return done


def _user_copy(f: io.BufferedReader, destination: BinaryIO, source: StoredRange, done: int) -> None:
    buffer = bytearray(min(_COPY_CHUNK, source.nbytes - done))
    view = memoryview(buffer)
    f.seek(source.begin + done)
    while done < source.nbytes:
        n = f.readinto(view[: min(len(buffer), source.nbytes - done)])
        if not n:
            raise _fail(source.path, f"truncated: ends before byte {source.end}")
        destination.write(view[:n])
        done += n


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def encode_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header for tensors laid out in ``specs`` order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        # what the reference reader accepts, checked here so no caller can write an unreadable file
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map strings to strings: {_short(dict(metadata))}")
        header["__metadata__"] = dict(metadata)
    if len({spec.name for spec in specs}) != len(specs) or any(bad_text(spec.name) for spec in specs):
        raise ValueError("tensor names must be unique and free of control characters and lone surrogates")
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
        *,
        drop_behind: bool = False,
    ) -> None:
        self.path = Path(path)
        self._specs = specs
        self._next = 0
        header = header if header is not None else encode_header(specs, metadata)  # may refuse: first
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 — closed in close()
        self._file.write(header)
        # a pass writing more than the page cache holds: each tensor leaves it once written
        self._behind = WriteBehind(self._file.fileno()) if drop_behind else None

    def _written(self, start: int) -> None:
        if self._behind is not None:
            self._file.flush()
            self._behind.written(start, self._file.tell() - start)

    @property
    def pending(self) -> list[TensorSpec]:
        return self._specs[self._next :]

    def write(self, name: str, tensor: torch.Tensor | bytes | StoredRange) -> None:
        """Append the next tensor (or its raw stored bytes, or a range of a file holding them)."""
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or spec.name != name:
            raise RuntimeError(f"{self.path}: expected tensor {spec and spec.name!r}, got {name!r}")
        if isinstance(tensor, StoredRange):
            if tensor.nbytes != spec.nbytes:
                raise RuntimeError(
                    f"{self.path}: tensor {name!r} has {tensor.nbytes} bytes, not {spec.nbytes}"
                )
            start = self._file.tell()
            copy_range(tensor, self._file)
            self._written(start)
            self._next += 1
            return
        if isinstance(tensor, bytes):
            data: bytes | memoryview = tensor
        else:
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise RuntimeError(f"{self.path}: tensor {name!r} is not {spec.shape} {spec.dtype}")
            data = _tensor_bytes(tensor)
        if len(data) != spec.nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} has {len(data)} bytes, not {spec.nbytes}")
        start = self._file.tell()
        self._file.write(data)
        self._written(start)
        self._next += 1

    def abort(self) -> None:
        """Close without checking completeness (the caller discards the file)."""
        self._file.close()

    def close(self) -> None:
        if self._behind is not None:
            self._file.flush()
            self._behind.close()
        self._file.close()
        if self._next != len(self._specs):
            missing = [spec.name for spec in self.pending]
            raise RuntimeError(f"{self.path}: closed before writing {missing[:3]}…")
