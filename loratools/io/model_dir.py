"""A written model folder: the files beside its weights, made to describe what was written.

- :func:`finish_model_dir`: copy the base folder's other files (config, tokenizer, sub-folders),
  its shard index when nothing changed size, and fix config.json (``torch_dtype`` after a cast,
  no ``quantization_config`` once the weights are plain floats);
- a grown vocabulary (an adapter carrying a larger embedding or lm_head, see
  :mod:`loratools.ops.merge.growth`): :func:`grown_shapes` and :func:`grown_layout` give the
  output its new shapes, :func:`update_grown_files` fixes config.json ``vocab_size`` and the
  index's ``total_size``, :func:`copy_tokenizer` brings the fine-tune's tokenizer along.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loratools.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, ShardLayout
from loratools.io.quant import drop_quantization_config
from loratools.io.quant.gguf_checkpoint import GgufCheckpoint
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import copy_model_files

__all__ = [
    "TOKENIZER_FILES",
    "copy_tokenizer",
    "finish_model_dir",
    "grown_layout",
    "grown_shapes",
    "update_grown_files",
]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)  # fmt: skip


def finish_model_dir(
    ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None, keep_quantization: bool = False
) -> list[str]:
    """Copy the model folder's other files and sub-folders (config, tokenizer, a sentence-transformers
    model's ``1_Pooling/``…); keep the source index verbatim when no dtype changed. A single-file
    base written as a folder has nothing to copy.

    Args:
        ckpt: the base the folder's weights were written from.
        folder: the (temporary) output folder, its weights already written.
        dtype: the dtype every float tensor was cast to; None when kept.
        keep_quantization: the weights were written in the base's quantization.

    Returns:
        the relative paths of the files copied.
    """
    if ckpt.model_dir is None:  # a GGUF base brings config.json (and a tokenizer) in its metadata
        return ckpt.write_model_files(folder, dtype) if isinstance(ckpt, GgufCheckpoint) else []
    copied = copy_model_files(ckpt.model_dir, folder)
    keep_index = dtype is None and not ckpt.quantized  # same tensors, same sizes
    if keep_index and ckpt.kind == "safetensors-sharded" and ckpt.index_name:
        shutil.copyfile(ckpt.model_dir / ckpt.index_name, folder / SAFETENSORS_INDEX)
    config = folder / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "torch_dtype" in data:
            data["torch_dtype"] = str(dtype).removeprefix("torch.")
            config.write_text(json.dumps(data, indent=2) + "\n")
    if ckpt.quantized and not keep_quantization:
        drop_quantization_config(config)  # float weights out: loaders must not expect packed ones
    return copied


def grown_shapes(layout: list[ShardLayout], updates: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Base tensor name → its new shape, for the updates whose ``replacement`` is larger than the base's."""
    shapes = {spec.name: tuple(spec.shape) for shard in layout for spec in shard.specs}
    out = {}
    for name, update in updates.items():
        tensor = getattr(update, "replacement", None)
        if tensor is not None and name in shapes and tuple(tensor.shape) != shapes[name]:
            out[name] = tuple(tensor.shape)
    return out


def grown_layout(layout: list[ShardLayout], grown: Mapping[str, tuple[int, ...]]) -> list[ShardLayout]:
    """The output layout with grown tensors' shapes; a shard holding one gets a new header."""
    out = []
    for shard in layout:
        if any(spec.name in grown for spec in shard.specs):
            specs = [TensorSpec(s.name, grown.get(s.name, s.shape), s.dtype) for s in shard.specs]
            shard = replace(shard, specs=specs, header=None)
        out.append(shard)
    return out


def update_grown_files(
    folder: Path, layout: list[ShardLayout], grown: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Make a written model folder describe its grown tensors; returns notes for the report.

    config.json ``vocab_size`` becomes the input embedding's new row count (the head's when only
    the head grew), and a shard index copied from the base gets the new ``total_size``.
    """
    if not grown:
        return []
    inputs = [
        shape[0] for name, shape in grown.items() if not re.search(r"(lm_head|embed_out)\.weight$", name)
    ]
    rows = max(inputs or [shape[0] for shape in grown.values()])
    notes = []
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.get("vocab_size") != rows:
            notes.append(
                f"vocabulary grown from {data.get('vocab_size')} to {rows} tokens (config.json vocab_size)"
            )
            data["vocab_size"] = rows
            config.write_text(json.dumps(data, indent=2) + "\n")
    total = sum(spec.nbytes for shard in layout for spec in shard.specs)
    for index in folder.glob("*.index.json"):
        data = json.loads(index.read_text())
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            data["metadata"]["total_size"] = total
            index.write_text(json.dumps(data, indent=2) + "\n")
    return notes


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` (the fine-tune's folder) into ``folder``, replacing
    the base's; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied
