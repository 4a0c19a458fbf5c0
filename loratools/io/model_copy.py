"""A model checkpoint (.bin/.pt, safetensors, a GGUF model) rewritten as safetensors shards.

What ``loratools convert MODEL --to safetensors`` does below the command: :func:`open_model_copy`
opens the source and plans the output (shards of at most ``max_shard_size``, or one file when the
output is named ``NAME.safetensors``), :func:`write_model_copy` streams the tensors into it one at
a time, atomically, with the model folder's other files (or a GGUF's config and tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loratools.errors import LoratoolsError
from loratools.io.checkpoint import ShardLayout, open_checkpoint
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import (
    CheckpointWriter,
    atomic_output,
    checkpoint_output_is_file,
    copy_model_files,
    model_files,
    plan_shards,
)
from loratools.progress import Progress

__all__ = ["DEFAULT_SHARD", "ModelCopy", "open_model_copy", "parse_size", "write_model_copy"]

SIZE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?I?B?)?\s*$", re.IGNORECASE)
DEFAULT_SHARD = "5GB"


def parse_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"500MiB"`` → 500·2²⁰, ``"1000"`` → 1000.

    Raises:
        LoratoolsError: not a size.
    """
    match = SIZE.match(text)
    if not match:
        raise LoratoolsError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (match["unit"] or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(match["n"]) * (1024 if "I" in unit else 1000) ** power)


@dataclass
class ModelCopy:
    """An opened source and its planned output.

    Attributes:
        specs: every output tensor (name, shape, cast dtype), in order.
        tensors: the tensors, read lazily one at a time, already cast.
        layout: the output shards.
        as_file: the output is the single file ``NAME.safetensors``.
        files: text files to write beside the shards (a GGUF's config.json, tokenizer).
        copy_from: a model folder whose other files are copied beside the shards.
        facts: what the report says about the source (``from``, a GGUF's notes and config).
    """

    specs: list[TensorSpec]
    tensors: Iterator[tuple[str, torch.Tensor]]
    layout: list[ShardLayout]
    as_file: bool
    files: dict[str, str]
    copy_from: Path | None
    facts: dict[str, Any] = field(default_factory=dict)


def open_model_copy(
    source: Path, output: str | Path, dtype: torch.dtype | None, max_shard_size: str | None, label: str
) -> ModelCopy:
    """Open ``source`` (resolved) and plan ``output``; ``label`` is the source as the user named it.

    Raises:
        LoratoolsError: an unreadable source, a bad size, or a sharded model named ``.safetensors``.
    """
    if source.suffix == ".gguf":
        from loratools.io.gguf_io import GgufModel

        model = GgufModel(source, dtype)
        specs, tensors, files = model.specs(), model.iter_tensors(), model.model_files()
        facts: dict[str, Any] = {"from": "gguf", "skipped": model.skipped, "notes": model.notes}
        facts["config"] = model.config
        copy_from = None
    else:
        ckpt = open_checkpoint(source)
        specs = [_cast_spec(i, dtype) for i in ckpt.infos()]
        tensors = _cast(ckpt.iter_tensors(), dtype)
        files, copy_from = {}, ckpt.model_dir
        facts = {"from": ckpt.kind}
    layout = plan_shards(specs, parse_size(max_shard_size or DEFAULT_SHARD))
    shards = len(layout) if len(layout) > 1 else None
    as_file = checkpoint_output_is_file(output, source=label, shards=shards)
    left = (model_files(copy_from) if copy_from is not None else []) + sorted(files)
    if as_file and left:
        facts["notes"] = [
            *facts.get("notes", []),
            f"{output} is a single weights file: {', '.join(left)} not written "
            f"(convert to a folder, -o {Path(output).stem}, to keep them)",
        ]
    return ModelCopy(specs, tensors, layout, as_file, files, copy_from, facts)


def write_model_copy(copy: ModelCopy, output: str | Path, *, force: bool, progress: Progress) -> Path:
    """Stream the tensors into HF-style safetensors shards under ``output`` (or into the single
    file ``output`` when ``copy.as_file``), atomically; returns ``output``."""
    with atomic_output(output, force=force) as path:
        folder, shards = (
            (path.parent, [replace(copy.layout[0], filename=path.name)])
            if copy.as_file
            else (path, copy.layout)
        )
        with CheckpointWriter(folder, shards, {"format": "pt"}) as writer:
            for name, tensor in copy.tensors:
                writer.write(name, tensor)
                progress(name)
        if not copy.as_file:
            if copy.copy_from is not None:
                copy_model_files(copy.copy_from, path)
            for name, text in copy.files.items():
                (path / name).write_text(text)
    return Path(output)


def _cast_spec(info: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    return TensorSpec(info.name, tuple(info.shape), cast)


def _cast(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
