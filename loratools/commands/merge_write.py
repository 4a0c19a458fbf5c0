"""The writers behind ``merge``/``unmerge``/``swap`` (:mod:`loratools.commands.merge`): the pure pass
of :mod:`loratools.ops.merge` between the reader and the writer threads of :mod:`loratools.io`.

- :func:`write_merged`: float weights out, in the base's layout (shards, index, metadata, model
  files), or one file; a grown vocabulary and the DoRA norms record handled;
- :func:`write_requantized`: ``--keep-quantization``, the base's own quantization out
  (bitsandbytes/FP8 parts next to each other in the base's files; a GGUF base as one GGUF file),
  with the survival record of :mod:`loratools.ops.merge.requant`.

Everything is written atomically (:func:`loratools.io.writer.atomic_output`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratools.device import cpu_math_threads
from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.io.buffers import BufferRing
from loratools.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, ShardLayout
from loratools.io.dora_record import record_path, write_record_file
from loratools.io.model_dir import (
    copy_tokenizer,
    finish_model_dir,
    grown_layout,
    grown_shapes,
    update_grown_files,
)
from loratools.io.prefetch import read_ahead
from loratools.io.quant import dequantize, quantize
from loratools.io.quant.gguf_checkpoint import GgufCheckpoint
from loratools.io.quant.gguf_types import WRITE
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import atomic_output, write_checkpoint
from loratools.ops.merge.plan import MergePlan
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.requant import requantized_update
from loratools.ops.merge.stream import merged_tensors, storage_order
from loratools.ops.merge.terms import FLOAT_DTYPES, MergeOptions, TensorUpdate
from loratools.ops.merge.update import apply_update, stacked_factors
from loratools.progress import Progress

__all__ = ["check_requantizable", "write_merged", "write_requantized"]


def write_merged(
    ckpt: Checkpoint,
    plan: MergePlan,
    output: Path,
    options: MergeOptions,
    *,
    force: bool,
    progress: Progress,
    as_file: bool | None = None,
) -> tuple[list[ModuleStats], list[str]]:
    """Write the merged checkpoint to ``output`` atomically: one file when ``as_file`` (default:
    when the base is one file; never for a sharded base), else a model folder.

    Returns:
        the precision record of every adapted tensor, and the model files copied next to the shards.
    """
    if options.keep_quantization:  # the base's own quantization out
        return write_requantized(ckpt, plan, output, options, force=force, progress=progress, as_file=as_file)
    layout = _output_layout(ckpt, options)
    grown = grown_shapes(layout, plan.updates)  # a grown vocabulary (ops/merge/growth.py)
    layout = grown_layout(layout, grown)
    stats: list[ModuleStats] = []
    files: list[str] = []
    threads = options.intra_op_threads(os.cpu_count() or 1)
    with atomic_output(output, force=force) as temporary, cpu_math_threads(threads):
        base = read_ahead(ckpt, storage_order(ckpt.infos(), plan, options))
        requantize = getattr(ckpt, "requantize", None)  # a quantized base: the unmerge error estimate
        # outputs cast into memory the writer has let go
        tensors = merged_tensors(
            base, plan, options, stats, progress, take=BufferRing().take, requantize=requantize
        )
        one_file = ckpt.model_dir is None if as_file is None else as_file
        if one_file:  # one file out
            _write(ckpt, temporary.parent, [replace(layout[0], filename=temporary.name)], tensors)
        else:
            _write(ckpt, temporary, layout, tensors)
            files = finish_model_dir(ckpt, temporary, options.dtype, options.keep_quantization)
            plan.warnings.extend(update_grown_files(temporary, layout, grown))
            files += copy_tokenizer(Path(options.tokenizer), temporary) if options.tokenizer else []
        if plan.dora is not None:  # the DoRA norms record goes with the output (ops/merge/dora.py)
            where = record_path(output if one_file else temporary, not one_file)
            write_record_file(where, *plan.dora.output_record().to_tensors())
    return stats, files


def _output_layout(ckpt: Checkpoint, options: MergeOptions) -> list[ShardLayout]:
    dtype_of = {}
    if options.dtype is not None:
        dtype_of = {i.name: options.dtype for i in ckpt.infos() if i.dtype in FLOAT_DTYPES}
    layout = ckpt.layout(dtype_of)
    if len(layout) == 1 and (ckpt.kind == "pytorch" or ckpt.model_dir is None):
        layout = [replace(layout[0], filename="model.safetensors")]  # what transformers looks for
    return layout


def _write(ckpt: Checkpoint, folder: Path, layout: list[ShardLayout], tensors: Iterator[Any]) -> None:
    index_name = SAFETENSORS_INDEX if ckpt.index_name else None
    write_checkpoint(folder, layout, ckpt.metadata, index_name, tensors)


# -- --keep-quantization ------------------------------------------------------------------------


def check_requantizable(ckpt: Checkpoint, plan: MergePlan, options: MergeOptions) -> None:
    """Refuse, before writing anything, what --keep-quantization cannot do.

    Raises:
        LoratoolsError: a base that is not quantized, a --dtype alongside, or adapted GGUF tensors of
            a type loratools cannot quantize (the k-quants), all listed.
    """
    if options.dtype is not None:
        raise LoratoolsError("--keep-quantization keeps the base's types; drop --dtype")
    if isinstance(ckpt, GgufCheckpoint):
        bad = [f"{n} ({ckpt.tensor_types[n]})" for n in plan.updates if ckpt.tensor_types[n] not in WRITE]
        if bad:
            raise LoratoolsError(
                f"{ckpt.path}: --keep-quantization cannot requantize {list_problems(bad)}: loratools writes "
                f"only {', '.join(WRITE)}; merge to a float output and run llama.cpp's llama-quantize on it"
            )
        return
    if not ckpt.quantized:
        raise LoratoolsError(f"{ckpt.path}: not a quantized checkpoint; --keep-quantization needs one")


def write_requantized(
    ckpt: Checkpoint,
    plan: MergePlan,
    output: Path,
    options: MergeOptions,
    *,
    force: bool,
    progress: Progress,
    as_file: bool | None = None,
) -> tuple[list[ModuleStats], list[str]]:
    """Write the merge in the base's quantization to ``output`` atomically (see the module docstring):
    a ``.gguf`` file for a GGUF base, else one file when ``as_file`` (default: when the base is
    one file), else a model folder."""
    check_requantizable(ckpt, plan, options)
    if isinstance(ckpt, GgufCheckpoint) and Path(output).suffix != ".gguf":
        raise LoratoolsError(
            f"-o {output}: --keep-quantization on a GGUF base writes a GGUF; name it {Path(output).stem}.gguf"
        )
    stats: list[ModuleStats] = []
    with atomic_output(output, force=force) as temporary:
        if isinstance(ckpt, GgufCheckpoint):
            _write_gguf(ckpt, plan, temporary, options, stats, progress)
            return stats, []
        layout = _stored_layout(ckpt)
        tensors = _stored_tensors(ckpt, plan, options, stats, progress)
        if ckpt.model_dir is None if as_file is None else as_file:
            _write(ckpt, temporary.parent, [replace(layout[0], filename=temporary.name)], tensors)
            return stats, []
        _write(ckpt, temporary, layout, tensors)
        return stats, finish_model_dir(ckpt, temporary, options.dtype, options.keep_quantization)


def _units(ckpt: Checkpoint, names: list[str]) -> list[list[str]]:
    """Stored names grouped: a quantized weight's parts together, at its packed weight's place."""
    hidden = {part for g in ckpt.quantized.values() for part in g.parts[1:]}
    return [list(ckpt.quantized[n].parts) if n in ckpt.quantized else [n] for n in names if n not in hidden]


def _stored_layout(ckpt: Checkpoint) -> list[ShardLayout]:
    out = []
    for file, shard in zip(ckpt.files, ckpt.layout(), strict=True):
        names = [n for n, info in ckpt.stored.items() if info.file == file]
        specs = [ckpt.stored[n] for unit in _units(ckpt, names) for n in unit]
        out.append(replace(shard, specs=[TensorSpec(s.name, s.shape, s.dtype) for s in specs], header=None))
    return out


def _stored_tensors(
    ckpt: Checkpoint, plan: MergePlan, options: MergeOptions, stats: list[ModuleStats], progress: Progress
) -> Iterator[tuple[str, torch.Tensor]]:
    """The output's stored tensors in layout order: requantized where adapted, else as stored."""
    for unit in _units(ckpt, list(ckpt.stored)):
        name, update = unit[0], plan.updates.get(unit[0])
        group = ckpt.quantized.get(name)
        if update is None:
            yield from ((part, ckpt.read_stored(part)) for part in unit)
        elif group is None:  # a float tensor of a quantized checkpoint: merged as usual
            w0 = update.replacement if update.replacement is not None else ckpt.read_stored(name)
            if update.loras:
                left, right = stacked_factors(update, options.device)
                merged, record = apply_update(name, w0.to(left.device), left, right, w0.dtype)
                stats.append(replace(record, adapters=len(update.loras)))
                w0 = merged.cpu()
            yield name, w0
        else:

            def requantize(w: torch.Tensor, group: Any = group) -> tuple[Any, torch.Tensor]:
                parts = quantize(group, w, ckpt.read_stored)
                return parts, dequantize(group, parts.__getitem__)

            parts, kept = requantized_update(
                name, group.kind, ckpt.get(name), update, requantize, options.device
            )
            stats += [kept] if kept is not None else []
            yield from ((part, parts[part]) for part in unit)
        progress(name)


def _write_gguf(
    ckpt: GgufCheckpoint,
    plan: MergePlan,
    path: Path,
    options: MergeOptions,
    stats: list[ModuleStats],
    progress: Progress,
) -> None:
    from loratools.formats import gguf as names
    from loratools.io.gguf_io import _gguf
    from loratools.io.quant import gguf_types
    from loratools.io.quant.gguf_write import read_stored, write_like

    gguf = _gguf()
    model = ckpt.model
    heads = names.model_heads(model.config)
    by_gguf = {model.gguf_tensor(n).name: n for n in ckpt.names()}

    def data() -> Iterator[tuple[str, np.ndarray]]:
        for t in model._reader.tensors:
            raw = read_stored(ckpt.path, t)
            hf = by_gguf.get(t.name, "")
            update = plan.updates.get(hf)
            if update is None:
                yield t.name, raw
                continue
            yield t.name, _gguf_update(gguf, gguf_types, t, raw, hf, update, names, heads, stats, options)
            progress(hf)

    write_like(gguf, model._reader, path, data())


def _gguf_update(
    gguf: Any, types: Any, t: Any, raw: np.ndarray, hf: str, update: TensorUpdate, names: Any,
    heads: tuple[int, int], stats: list[ModuleStats], options: MergeOptions,
) -> np.ndarray:  # fmt: skip
    """One adapted GGUF tensor, merged in GGUF's own row order: llama.cpp stores q/k rows
    permuted, so Δ = P·L·R gets its left factor's rows permuted (and a replacement too)."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    w0 = torch.from_numpy(types.dequantize(gguf, raw.reshape(t.data.shape), t.tensor_type)).reshape(shape)
    n_head = names.qk_heads(t.name, *heads)
    permute = (lambda m: names.permute_qk(m, n_head)) if n_head else (lambda m: m)

    def requantize(w: torch.Tensor) -> tuple[Any, torch.Tensor]:
        stored = types.quantize(gguf, w.numpy(), t.tensor_type)
        new = types.dequantize(gguf, stored.reshape(-1).view(np.uint8).reshape(shape[0], -1), t.tensor_type)
        return stored, torch.from_numpy(new).reshape(shape)

    stored, record = requantized_update(
        hf, t.tensor_type.name, w0, update, requantize, options.device, permute
    )
    if record is not None:
        stats.append(record)
    if stored.nbytes != t.n_bytes:
        raise ShapeMismatch(f"{hf}: requantized to {stored.nbytes} bytes, the base has {t.n_bytes}")
    return stored
