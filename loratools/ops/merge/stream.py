"""The streaming pass: base tensors in, merged tensors out, one at a time in storage order.

Three threads overlap: a reader fetches the next tensor, the caller's thread does the math on
this one, a writer stores the previous one. Tensors no adapter touches are copied as their
stored bytes, so untouched files are byte-identical. Peak memory is about two float32 copies of
the largest adapted tensor plus the adapters.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from queue import Queue
from threading import Thread
from typing import Any

import torch

from loratools.io.buffers import BufferRing
from loratools.io.checkpoint import SAFETENSORS_INDEX, Checkpoint, ShardLayout
from loratools.io.dora_record import record_path, write_record_file
from loratools.io.quant import drop_quantization_config
from loratools.io.quant.gguf_checkpoint import GgufCheckpoint
from loratools.io.writer import CheckpointWriter, atomic_output, copy_model_files
from loratools.ops.merge.fused import apply_fused, is_fused
from loratools.ops.merge.growth import copy_tokenizer, grown_layout, grown_shapes, update_grown_files
from loratools.ops.merge.plan import MergePlan
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.requant import unmerge_error
from loratools.ops.merge.terms import FLOAT_DTYPES, MergeOptions
from loratools.ops.merge.update import Scratch, apply_update, stacked_factors
from loratools.progress import Progress


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
        from loratools.ops.merge.requant import write_requantized

        return write_requantized(ckpt, plan, output, options, force=force, progress=progress, as_file=as_file)
    layout = _output_layout(ckpt, options)
    grown = grown_shapes(layout, plan.updates)  # a grown vocabulary (ops/merge/growth.py)
    layout = grown_layout(layout, grown)
    stats: list[ModuleStats] = []
    files: list[str] = []
    threads = options.intra_op_threads(os.cpu_count() or 1)
    with atomic_output(output, force=force) as temporary, _intra_op_threads(threads):
        tensors = merged_tensors(ckpt, plan, options, stats, progress)
        one_file = ckpt.model_dir is None if as_file is None else as_file
        if one_file:  # one file out
            _write(ckpt, temporary.parent, [replace(layout[0], filename=temporary.name)], tensors)
        else:
            _write(ckpt, temporary, layout, tensors)
            files = _finish_model_dir(ckpt, temporary, options)
            plan.warnings.extend(update_grown_files(temporary, layout, grown))
            files += copy_tokenizer(Path(options.tokenizer), temporary) if options.tokenizer else []
        if plan.dora is not None:  # the DoRA norms record goes with the output (ops/merge/dora.py)
            where = record_path(output if one_file else temporary, not one_file)
            write_record_file(where, *plan.dora.output_record().to_tensors())
    return stats, files


def _read_ahead(ckpt: Checkpoint, plan: list[tuple[str, bool]]) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor or stored bytes) in order, reading the next one in a thread meanwhile
    (into reused buffers: a tensor still held, by the writer say, is never read into)."""
    buffers = BufferRing()

    def read(item: tuple[str, bool]) -> Any:  # a tensor, stored bytes or a StoredRange
        name, raw = item
        return ckpt.stored_range(name) if raw else ckpt.get_buffered(name, buffers)

    if not plan:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-read") as pool:
        pending = pool.submit(read, plan[0])
        for position, (name, _) in enumerate(plan):
            data = pending.result()
            if position + 1 < len(plan):
                pending = pool.submit(read, plan[position + 1])
            yield name, data


def merged_tensors(
    ckpt: Checkpoint, plan: MergePlan, options: MergeOptions, stats: list[ModuleStats], progress: Progress
) -> Iterator[tuple[str, torch.Tensor | bytes]]:
    """The output tensors in storage order: updated, replaced, cast, or the stored bytes as they are."""
    device = torch.device(options.device)
    scratch = Scratch(device, BufferRing().take)  # outputs cast into memory the writer has let go
    order = []
    for info in ckpt.infos():
        keep = info.name not in plan.updates and (options.dtype is None or info.dtype not in FLOAT_DTYPES)
        order.append((info.name, keep))
    for name, data in _read_ahead(ckpt, order):
        update = plan.updates.get(name)
        if not isinstance(data, torch.Tensor):  # stored bytes, or where they are: copied as they are
            yield name, data
        elif update is None:
            yield name, data.to(options.dtype or data.dtype)
        else:
            w0 = update.replacement if update.replacement is not None else data
            out_dtype = options.dtype or data.dtype
            if plan.dora is not None and plan.dora.handles(update):  # DoRA: not an added L @ R
                out, record = plan.dora.apply(name, w0, update, out_dtype, device, scratch)
                stats.append(record)
                yield name, out.cpu()
            elif is_fused(update):  # fused (E, p, q) experts: one L @ R per touched slice
                out, record = apply_fused(name, w0, update, out_dtype, device)
                stats.append(record)
                yield name, out.cpu()
            elif update.loras:
                left, right = stacked_factors(update, device)
                out, record = apply_update(name, w0.to(device), left, right, out_dtype, scratch)
                record = replace(record, adapters=len(update.loras))
                stats.append(unmerge_error(ckpt, name, out, update, record))  # a quantized merged model
                yield name, out.cpu()
            else:
                yield name, w0.to(out_dtype)
        progress(name)


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    with CheckpointWriter(folder, layout, ckpt.metadata or {"format": "pt"}, index_name) as writer:
        _write_behind(tensors, writer.write)


def _write_behind(items: Iterator[tuple[str, Any]], write: Callable[[str, Any], None]) -> None:
    """Call ``write`` on each item in a second thread, so computing the next tensor overlaps
    writing this one (reads already run ahead in another). At most one item waits in between."""
    pending: Queue[tuple[str, Any] | None] = Queue(maxsize=1)
    failures: list[BaseException] = []

    def consume() -> None:
        while (item := pending.get()) is not None:
            if not failures:
                try:
                    write(*item)
                except BaseException as exc:  # handed to the producer below
                    failures.append(exc)

    thread = Thread(target=consume, name="loratools-write", daemon=True)
    thread.start()
    try:
        for item in items:
            if failures:
                break
            pending.put(item)
    finally:
        pending.put(None)
        thread.join()
    if failures:
        raise failures[0]


def _finish_model_dir(ckpt: Checkpoint, folder: Path, options: MergeOptions) -> list[str]:
    """Copy the model folder's other files and sub-folders (config, tokenizer, a sentence-transformers
    model's ``1_Pooling/``…); keep the source index verbatim when no dtype changed. A single-file
    base written as a folder has nothing to copy."""
    if ckpt.model_dir is None:  # a GGUF base brings config.json (and a tokenizer) in its metadata
        return ckpt.write_model_files(folder, options.dtype) if isinstance(ckpt, GgufCheckpoint) else []
    copied = copy_model_files(ckpt.model_dir, folder)
    keep_index = options.dtype is None and not ckpt.quantized  # same tensors, same sizes
    if keep_index and ckpt.kind == "safetensors-sharded" and ckpt.index_name:
        shutil.copyfile(ckpt.model_dir / ckpt.index_name, folder / SAFETENSORS_INDEX)
    config = folder / "config.json"
    if options.dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and "torch_dtype" in data:
            data["torch_dtype"] = str(options.dtype).removeprefix("torch.")
            config.write_text(json.dumps(data, indent=2) + "\n")
    if ckpt.quantized and not options.keep_quantization:
        drop_quantization_config(config)  # float weights out: loaders must not expect packed ones
    return copied
