"""Writing a GGUF model shaped like another one: same metadata, same tensors in the same order and
types, some tensors' data replaced (``merge --keep-quantization`` on a GGUF base).

The header (metadata and every tensor's name, shape, type and offset) is written first, from
the source file; the data then streams tensor by tensor, so memory stays one tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loratools.errors import CheckpointError, ShapeMismatch


def read_stored(path: Path, tensor: Any) -> np.ndarray:
    """A GGUF tensor's stored bytes (uint8), read into fresh memory rather than through a map."""
    buffer = np.empty(tensor.n_bytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(tensor.data_offset)
        if f.readinto(buffer.data) != tensor.n_bytes:
            raise CheckpointError(f"{path}: truncated inside tensor {tensor.name}; re-download it")
    return buffer


def write_like(gguf: Any, reader: Any, path: Path, data: Iterator[tuple[str, np.ndarray]]) -> None:
    """Write ``path`` with ``reader``'s metadata and tensor table, the data from ``data``.

    Args:
        gguf: the gguf package.
        reader: the source ``GGUFReader``.
        path: the file to create (the caller makes it atomic).
        data: (GGUF tensor name, stored array) in the source's tensor order, each exactly as many
            bytes as the source tensor.

    Raises:
        ShapeMismatch: a tensor out of order or of another size (a bug, not a user error).
    """
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]  # numpy order, outermost first
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    expected = iter(reader.tensors)
    for name, array in data:
        t = next(expected)
        if t.name != name or array.nbytes != t.n_bytes:
            raise ShapeMismatch(f"{path}: tensor {name} ({array.nbytes} bytes) written in place of {t.name}")
        writer.write_tensor_data(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    writer.close()
