"""Summaries of a checkpoint or an adapter, as plain dictionaries (the ``inspect`` command)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loratools.adapter import Adapter
from loratools.io.checkpoint import Checkpoint

__all__ = ["summarize_adapter", "summarize_checkpoint"]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_checkpoint(ckpt: Checkpoint, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tensors, parameters, dtypes, files and size of a checkpoint, plus its model config facts."""
    infos = ckpt.infos()
    dtypes = Counter(_dtype_name(i.dtype) for i in infos)
    params_by_dtype: Counter[str] = Counter()
    for info in infos:
        params_by_dtype[_dtype_name(info.dtype)] += int(_numel(info.shape))
    summary: dict[str, Any] = {
        "kind": "checkpoint",
        "format": ckpt.kind,
        "path": str(ckpt.path),
        "tensors": len(infos),
        "parameters": ckpt.num_parameters,
        "bytes": ckpt.nbytes,
        "dtypes": dict(dtypes),
        "parameters_by_dtype": dict(params_by_dtype),
        "files": [f.name for f in ckpt.files],
        "shards": len(ckpt.files),
        "metadata": ckpt.metadata,
        "largest_tensor": max(infos, key=lambda i: i.nbytes).name if infos else None,
    }
    if config:
        keys = (
            "model_type",
            "architectures",
            "hidden_size",
            "num_hidden_layers",
            "vocab_size",
            "torch_dtype",
        )
        summary["config"] = {k: config[k] for k in keys if k in config}
    return summary


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def summarize_adapter(adapter: Adapter, fmt: str) -> dict[str, Any]:
    """Format, ranks, alphas, scales, targets and parameter count of an adapter."""
    weights = adapter.weights.values()
    ranks = Counter(w.rank for w in weights)
    scales = sorted({round(w.scale, 6) for w in weights})
    return {
        "kind": "adapter",
        "format": fmt,
        "modules": len(adapter.weights),
        "tensors": 2 * len(adapter.weights) + len(adapter.saved_modules),
        "parameters": adapter.num_parameters,
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "rank": max(ranks) if ranks else 0,
        "alpha": sorted({w.alpha for w in weights}),
        "scale": scales,
        "use_rslora": any(w.use_rslora for w in weights),
        "dtype": sorted({_dtype_name(w.dtype) for w in weights}),
        "target_modules": adapter.target_modules,
        "saved_modules": sorted(adapter.saved_modules),
        "base_model": adapter.base_model,
        "provenance": dict(adapter.provenance),
    }
