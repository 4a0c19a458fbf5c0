"""Merging a fine-tune with a grown vocabulary: the base's embedding and lm_head grow with it.

An adapter extracted from a fine-tune that added tokens carries its embedding (V + n, dim) and
lm_head (V + n, dim) whole (``modules_to_save``), while the base has V rows. Merging writes the
adapter's matrices in place of the base's — the output tensors have V + n rows — and then fixes
what describes the shapes: config.json ``vocab_size``, and the byte count of a copied shard index.
The fine-tune's tokenizer (which knows the new tokens) is copied when given (``merge --tokenizer``).

Only growth of embeddings and heads by rows is allowed: any other shape change is still a misfit,
and so is a LoRA from another adapter on a tensor that this merge grows.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from loratools.io.checkpoint import ShardLayout
from loratools.io.safetensors_file import TensorSpec

__all__ = [
    "TOKENIZER_FILES",
    "copy_tokenizer",
    "grown_layout",
    "grown_shapes",
    "grows",
    "lora_on_grown",
    "restore_base_layer",
    "update_grown_files",
]

GROWABLE = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|word_embeddings|lm_head)\.weight$")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
)  # fmt: skip


def grows(name: str, new: tuple[int, ...], old: tuple[int, ...]) -> bool:
    """Whether a replacement of shape ``new`` for base tensor ``name`` of shape ``old`` is a grown
    vocabulary: an embedding or head, 2-D, same width, more rows."""
    return bool(GROWABLE.search(name)) and len(new) == len(old) == 2 and new[1] == old[1] and new[0] > old[0]


def grown_shapes(layout: list[ShardLayout], updates: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Base tensor name → its new shape, for the updates whose replacement is larger than the base's."""
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


def lora_on_grown(updates: Mapping[str, Any], infos: Mapping[str, Any]) -> list[str]:
    """Problems: LoRA factors (made for the base's rows) on a tensor that a replacement grows."""
    problems = []
    for name, update in updates.items():
        tensor = getattr(update, "replacement", None)
        if tensor is None or name not in infos or not getattr(update, "loras", None):
            continue
        if tuple(tensor.shape) != tuple(infos[name].shape):
            problems.append(
                f"{name}: an adapter grows it to {list(tensor.shape)} while another adds LoRA factors for "
                f"{list(infos[name].shape)}; merge them in two steps"
            )
    return problems


def restore_base_layer(update: Any, copy: Any, adapter: Any, name: str) -> None:
    """Unmerge/swap of an adapter that carries PEFT's copy of a base layer under its LoRA
    (``<module>.base_layer.weight``, read as a replacement of ``<module>.weight``).

    Merging it wrote ``copy + s·B@A``; the model without it is the copy, so the copy replaces the
    tensor and this adapter's own LoRA term on it is dropped (not subtracted).

    Args:
        update: the tensor's :class:`~loratools.ops.merge.terms.TensorUpdate`.
        copy: the base-layer copy.
        adapter: the adapter being removed.
        name: the copy's tensor name in the adapter (``<module>.weight``).
    """
    lora = adapter.weights[name.removesuffix(".weight")]
    update.loras = [term for term in update.loras if term[0] is not lora]
    if update.replacement is None:  # a swap's added adapter may bring its own copy: that one wins
        update.replacement = copy
