"""The DoRA norms record on disk: written beside a merge's output, read by unmerge and swap.

A model folder keeps it inside as ``dora_norms.loratools``; a single ``NAME.safetensors``
output gets ``NAME.dora_norms.loratools`` beside it. The file is in the safetensors format
(tensors ``"<index>:<base tensor name>"`` = the norms, float32; metadata: the adapters merged, in
order), under a suffix that no checkpoint reader mistakes for model weights. What it holds is
:class:`loratools.ops.merge.dora.DoraRecord`; docs/merge.md says how it is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from loratools.errors import CheckpointError
from loratools.io.writer import write_tensors

__all__ = ["RECORD_NAME", "read_record_file", "record_path", "write_record_file"]

RECORD_NAME = "dora_norms.loratools"


def record_path(model: Path, folder: bool) -> Path:
    """Where the record of the model at ``model`` lives (inside a folder, beside a file)."""
    model = Path(model)
    return model / RECORD_NAME if folder else model.with_name(f"{model.stem}.{RECORD_NAME}")


def read_record_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The record's tensors and metadata, or None when there is no file at ``path``.

    Raises:
        CheckpointError: an unreadable file.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable DoRA norms record ({exc})") from exc
    return tensors, metadata


def write_record_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the record to ``path`` (replacing one there); with no tensors, remove ``path`` instead."""
    if not tensors:
        path.unlink(missing_ok=True)
        return
    write_tensors(tensors, metadata, path, force=True)  # loratools' one writer, atomically
