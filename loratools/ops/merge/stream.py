"""The streaming pass: base tensors in, merged tensors out, one at a time in storage order.

Pure: the caller reads (:func:`loratools.io.prefetch.read_ahead`, one tensor ahead on a thread,
stored bytes for what :func:`storage_order` marks as kept) and writes
(:func:`loratools.io.writer.write_checkpoint`, on a writer thread), so three threads overlap.
Tensors no adapter touches stay their stored bytes, so untouched files are byte-identical. Peak
memory is about two float32 copies of the largest adapted tensor plus the adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from loratools.ops.merge.fused import apply_fused, is_fused
from loratools.ops.merge.plan import MergePlan
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.requant import Requantizer, unmerge_error
from loratools.ops.merge.terms import FLOAT_DTYPES, MergeOptions, TensorInfo
from loratools.ops.merge.update import Scratch, apply_update, stacked_factors
from loratools.progress import Progress

__all__ = ["merged_tensors", "storage_order"]


def storage_order(
    infos: Iterable[TensorInfo], plan: MergePlan, options: MergeOptions
) -> list[tuple[str, bool]]:
    """Every base tensor in storage order, with True where its stored bytes go out as they are
    (no update touches it and no float cast applies)."""
    order = []
    for info in infos:
        keep = info.name not in plan.updates and (options.dtype is None or info.dtype not in FLOAT_DTYPES)
        order.append((info.name, keep))
    return order


def merged_tensors(
    tensors: Iterable[tuple[str, Any]],
    plan: MergePlan,
    options: MergeOptions,
    stats: list[ModuleStats],
    progress: Progress,
    *,
    take: Callable[[int], torch.Tensor] | None = None,
    requantize: Requantizer | None = None,
) -> Iterator[tuple[str, Any]]:
    """The output tensors in storage order: updated, replaced, cast, or the stored bytes as they are.

    Args:
        tensors: the base's tensors in :func:`storage_order`; where it says so, their stored
            bytes or anything else that is not a tensor (where the bytes are, for the writer to
            copy file to file: ops never look inside), passed through unchanged.
        plan: the updates (:func:`~loratools.ops.merge.plan.plan_merge`).
        options: output dtype and device.
        stats: gets one precision record per adapted tensor.
        progress: called once per tensor.
        take: allocator of the byte buffers outputs are cast into (memory the writer has let
            go: :meth:`loratools.io.buffers.BufferRing.take`); None allocates fresh memory.
        requantize: a quantized base's ``requantize(name, w)``, for the unmerge error estimate.
    """
    device = torch.device(options.device)
    scratch = Scratch(device, take)  # outputs cast into memory the writer has let go
    for name, data in tensors:
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
                stats.append(unmerge_error(requantize, name, out, update, record))  # a quantized merged model
                yield name, out.cpu()
            else:
                yield name, w0.to(out_dtype)
        progress(name)
