"""``merge --keep-quantization``: the merged weights written back in the base's own quantization.

For each adapted quantized weight, with W0 = dequant(stored) and Δ = L @ R::

    W  = Q(W0 + Δ)                      requantized with fresh scales (bitsandbytes, FP8, GGUF)
    survival  = ‖W − W0‖_F / ‖Δ‖_F      how much of the update's size is still there
    direction = ⟨W − W0, Δ⟩ / (‖W − W0‖_F ‖Δ‖_F)   whether what is left still points along Δ
    lost_norm = ‖W − W0 − Δ‖_F

Everything else is copied as stored: the output has the base's tensors, shapes, dtypes, GGUF
types and metadata. A bitsandbytes or FP8 output keeps the base's files (each quantized weight's
parts are written next to each other); a GGUF output is one GGUF file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.io.checkpoint import Checkpoint, ShardLayout
from loratools.io.quant import dequantize, quantize
from loratools.io.quant.gguf_checkpoint import GgufCheckpoint
from loratools.io.quant.gguf_types import WRITE
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import atomic_output
from loratools.ops.merge.plan import MergePlan
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.terms import MergeOptions, TensorUpdate
from loratools.ops.merge.update import delta_norm, stacked_factors
from loratools.progress import Progress

Requantize = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]  # W → (stored form, dequant(stored))


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


def survival_stats(
    name: str, kind: str, w0: torch.Tensor, new: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> ModuleStats:
    """The record of one requantized weight (see the module docstring). ``w0``, ``new``: float32
    (d, k); ``left`` (d, R), ``right`` (R, k) with Δ = left @ right, never formed apart."""
    kept = new - w0  # (d, k): Q(W0 + Δ) − Q(W0)
    inner = float(((left.T @ kept) * right).sum())  # ⟨kept, LR⟩ = Σ (Lᵀ kept) ⊙ R
    kept_norm = float(torch.linalg.vector_norm(kept))
    lost_norm = float(torch.linalg.vector_norm(kept.addmm_(left, right, alpha=-1.0)))
    dn = delta_norm(left, right)
    survival = kept_norm / dn if dn > 0 else math.nan
    direction = inner / (kept_norm * dn) if kept_norm > 0 and dn > 0 else 0.0
    base_norm = float(torch.linalg.vector_norm(w0))
    return ModuleStats(
        name, tuple(w0.shape), kind, 0, base_norm, dn, lost_norm, survival=survival, direction=direction
    )


def requantized_update(
    name: str,
    kind: str,
    w0: torch.Tensor,
    update: TensorUpdate,
    requantize: Requantize,
    device: str,
    rows: Callable[[torch.Tensor], torch.Tensor] = lambda m: m,
) -> tuple[Any, ModuleStats | None]:
    """``Q(W0 + Σ wᵢsᵢBᵢAᵢ)`` (stored form) and its survival record; a ``modules_to_save``
    replacement stands in for W0 and is requantized too. ``rows`` reorders the update's rows
    into the stored order (llama.cpp's q/k permutation: Δ = P·L·R, so only L is permuted)."""
    if update.replacement is not None:
        w0 = rows(update.replacement)
    w0 = w0.to(torch.float32)
    if not update.loras:
        stored, _ = requantize(w0)
        return stored, None
    left, right = stacked_factors(update, device)
    left = rows(left)
    total = w0.to(left.device, copy=True).addmm_(left, right).cpu()  # (d, k) float32
    stored, new = requantize(total)
    record = survival_stats(name, kind, w0, new, left.cpu(), right.cpu())
    return stored, replace(record, adapters=len(update.loras))


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
        from loratools.ops.merge.stream import _finish_model_dir, _write

        layout = _stored_layout(ckpt)
        tensors = _stored_tensors(ckpt, plan, options, stats, progress)
        if ckpt.model_dir is None if as_file is None else as_file:
            _write(ckpt, temporary.parent, [replace(layout[0], filename=temporary.name)], tensors)
            return stats, []
        _write(ckpt, temporary, layout, tensors)
        return stats, _finish_model_dir(ckpt, temporary, options)


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
    from loratools.ops.merge.update import apply_update

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


def unmerge_error(
    ckpt: Checkpoint, name: str, out: torch.Tensor, update: TensorUpdate, record: ModuleStats
) -> ModuleStats:
    """For adapters removed from a quantized model, ``record`` with ``quantization_error`` set.

    The removal starts from the *rounded* merge Q(W0 + Δ), so the output misses W0 by that
    rounding, ``Q(W0+Δ) − (W0+Δ)``, which nothing can recover. Its size is estimated by the
    rounding of the output itself, ``‖Q(W) − W‖``, in units of ‖Δ‖.
    """
    requantize = getattr(ckpt, "requantize", None)
    if requantize is None or not any(weight < 0 for _, weight, _ in update.loras):
        return record
    w = out.detach().to("cpu", torch.float32)
    back = requantize(name, w)
    if back is None:
        return record
    noise = float(torch.linalg.vector_norm(back - w))
    return replace(
        record, quantization_error=noise / record.delta_norm if record.delta_norm > 0 else math.inf
    )
