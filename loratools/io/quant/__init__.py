"""Quantized checkpoints, read one tensor at a time as plain float32 weights.

A quantized weight is stored as several tensors (packed codes, scales, state); a
:class:`~loratools.io.quant.group.QuantGroup` names them. :func:`find_groups` finds every group of
a checkpoint, :func:`dequantize` turns one into its float32 weight under its plain name, and
:func:`quantize` turns a float32 weight back into the stored tensors (``merge --keep-quantization``).

Schemes: bitsandbytes 4-bit nf4/fp4 (with and without double quantization) and 8-bit
(:mod:`.bnb`), FP8 e4m3/e5m2 with per-tensor, per-channel or block scales (:mod:`.fp8`). GGUF
block types are in :mod:`.gguf_types`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from loratools.errors import CheckpointError
from loratools.io.quant import bnb, fp8
from loratools.io.quant.group import QuantGroup
from loratools.io.safetensors_file import TensorInfo

__all__ = ["QuantGroup", "dequantize", "find_groups", "logical_infos", "quantize", "requantize"]

Read = Callable[[str], torch.Tensor]


def find_groups(
    infos: Mapping[str, TensorInfo], read: Read, model_dir: Path | None = None
) -> dict[str, QuantGroup]:
    """Plain weight name → its group, for every quantized weight of a checkpoint ({} when none).

    Raises:
        CheckpointError: a quantized weight that lacks one of its parts, or whose state is unreadable.
    """
    groups = (
        bnb.find_groups(infos, read)
        if any(i.dtype in (torch.uint8, torch.int8) for i in infos.values())
        else []
    )
    if any(i.dtype in fp8.FP8 for i in infos.values()):
        groups += fp8.find_groups(infos, _block_size(model_dir))
    found: dict[str, QuantGroup] = {}
    claimed: dict[str, str] = {}
    for group in groups:
        for part in group.parts:
            if part in claimed:
                raise CheckpointError(
                    f"{infos[part].file}: tensor {part} belongs to both {claimed[part]} and {group.name}"
                )
            claimed[part] = group.name
        found[group.name] = group
    return found


def _block_size(model_dir: Path | None) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` from config.json, if there is one."""
    config = model_dir / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return None
    try:
        size = json.loads(config.read_text()).get("quantization_config", {}).get("weight_block_size")
        return (int(size[0]), int(size[1])) if size else None
    except (ValueError, AttributeError, TypeError, IndexError):
        return None


def logical_infos(infos: Mapping[str, TensorInfo], groups: Mapping[str, QuantGroup]) -> dict[str, TensorInfo]:
    """The checkpoint as readers see it: each group as one float32 tensor of its plain shape at its
    weight's position, its other parts hidden, every other tensor as stored."""
    hidden = {part for g in groups.values() for part in g.parts[1:]}
    out = {}
    for name, info in infos.items():
        if name in groups:
            shape = groups[name].shape
            out[name] = TensorInfo(name, shape, torch.float32, info.file, info.begin, info.end)
        elif name not in hidden:
            out[name] = info
    return out


def dequantize(group: QuantGroup, read: Read) -> torch.Tensor:
    """The float32 weight of ``group`` (shape ``group.shape``)."""
    module = bnb if group.kind.startswith("bnb-") else fp8
    return module.dequantize(group, read)


def quantize(group: QuantGroup, w: torch.Tensor, read: Read) -> dict[str, torch.Tensor]:
    """``w`` (float32, ``group.shape``) as ``group``'s stored tensors, scales recomputed."""
    module = bnb if group.kind.startswith("bnb-") else fp8
    return module.quantize(group, w.to(torch.float32), read)


def requantize(group: QuantGroup, w: torch.Tensor, read: Read) -> torch.Tensor:
    """``dequant(Q(w))``: ``w`` (float32) quantized as ``group`` and read back (float32)."""
    return dequantize(group, quantize(group, w, read).__getitem__)


def drop_quantization_config(config: Path) -> None:
    """Remove ``quantization_config`` from a copied config.json (its weights are now plain floats)."""
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return
    if isinstance(data, dict) and data.pop("quantization_config", None) is not None:
        config.write_text(json.dumps(data, indent=2) + "\n")
