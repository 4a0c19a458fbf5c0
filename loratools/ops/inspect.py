"""Summaries of a checkpoint or an adapter, as plain dictionaries (the ``inspect`` command)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from loratools.adapter import Adapter
from loratools.ops.dora import dora_modules, dora_summary
from loratools.ops.structure import model_structure

__all__ = [
    "summarize_adapter",
    "summarize_adapter_tensors",
    "summarize_checkpoint",
    "summarize_gguf",
    "summarize_training",
]


class CheckpointView(Protocol):
    """What inspect reads of an opened checkpoint (:class:`loratools.io.checkpoint.Checkpoint`):
    ops take the object io opened, never a path."""

    path: Path
    kind: str
    files: list[Path]
    metadata: dict[str, str]

    def infos(self) -> Sequence[Any]: ...  # each with .name, .shape, .dtype, .nbytes

    @property
    def num_parameters(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


# kohya sd-scripts' training settings, in the order a user reads them: (label, ss_* keys)
TRAINING_FIELDS: list[tuple[str, tuple[str, ...]]] = [
    ("network", ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")),
    ("base model", ("ss_sd_model_name", "ss_base_model_version", "ss_v2")),
    ("resolution", ("ss_resolution",)),
    ("epochs / steps", ("ss_num_epochs", "ss_epoch", "ss_max_train_steps", "ss_steps")),
    ("learning rate", ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler")),
    ("optimizer", ("ss_optimizer",)),
    (
        "dataset",
        ("ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch", "ss_batch_size_per_device"),
    ),
]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_checkpoint(
    ckpt: CheckpointView, config: dict[str, Any] | None = None, tokenizer: dict[str, Any] | None = None
) -> dict[str, Any]:
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
        "training": summarize_training(ckpt.metadata),
        "largest_tensor": max(infos, key=lambda i: i.nbytes).name if infos else None,
        "structure": model_structure({i.name: tuple(i.shape) for i in infos}, config, tokenizer),
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


def _lycoris_modules(adapter: Adapter) -> dict[str, Any]:
    """LoHa/LoKr modules: dim, alpha, scale, Tucker or not, and each stored factor's shape."""
    from loratools.formats.lycoris import describe

    return {n: describe(w) for n, w in adapter.weights.items() if w.kind in ("loha", "lokr")}


def _factor_tensors(weights: list[Any]) -> int:
    """The factor tensors the modules store: LoRA's A and B, each LoHa/LoKr part (Tucker cores too),
    and one A and one B per fused expert parameter (PEFT stacks its experts' factors)."""
    fused = {(w.module, w.depth) for w in weights if getattr(w, "param", None) is not None}
    plain = [w for w in weights if getattr(w, "param", None) is None]
    return 2 * len(fused) + sum(len(t()) if callable(t := getattr(w, "tensors", None)) else 2 for w in plain)


def summarize_adapter(adapter: Adapter, fmt: str) -> dict[str, Any]:
    """Format, kinds, ranks, alphas, scales, targets and parameter count of an adapter.

    Alpha, scale and rsLoRA are read from the kinds that have them (LoRA, DoRA); ``kinds``
    counts modules per kind (``{"lora": 14}``).
    """
    weights = list(adapter.weights.values())
    ranks = Counter(w.rank for w in weights)
    alphas = [float(a) for w in weights if (a := getattr(w, "alpha", None)) is not None]
    scales = [float(s) for w in weights if (s := getattr(w, "scale", None)) is not None]
    return {
        "kind": "adapter",
        "format": fmt,
        "kinds": dict(Counter(getattr(w, "kind", "lora") for w in weights)),
        "lycoris_modules": _lycoris_modules(adapter),
        "modules": len(adapter.weights),
        "tensors": _factor_tensors(weights) + len(adapter.saved_modules) + len(dora_modules(adapter)),
        "parameters": adapter.num_parameters,
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "rank": max(ranks) if ranks else 0,
        "alpha": sorted(set(alphas)),
        "scale": sorted({round(s, 6) for s in scales}),
        "use_rslora": any(getattr(w, "use_rslora", False) for w in weights),
        "dtype": sorted({_dtype_name(w.dtype) for w in weights}),
        "target_modules": adapter.target_modules,
        "saved_modules": sorted(adapter.saved_modules),
        "base_model": adapter.base_model,
        "provenance": dict(adapter.provenance),
        **dora_summary(adapter),  # DoRA: per-module magnitude statistics
    }


def _present(metadata: dict[str, str], keys: tuple[str, ...]) -> dict[str, str]:
    return {k.removeprefix("ss_"): metadata[k] for k in keys if metadata.get(k) not in (None, "", "None")}


def summarize_training(metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``ss_*`` training settings in a few lines: label → "key value, key value".

    A kohya file carries a hundred or more ``ss_*`` entries (tag frequencies, dataset folders,
    hashes); these are the ones that say how it was trained. Empty when there are none.
    """
    lines = {}
    for label, keys in TRAINING_FIELDS:
        found = _present(metadata, keys)
        if found:
            lines[label] = ", ".join(f"{k} {v}" for k, v in found.items())
    return lines


def summarize_adapter_tensors(
    kind: dict[str, Any], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], metadata: dict[str, str]
) -> dict[str, Any]:
    """What can be said of an adapter loratools does not load (LoKr, LoHa, …) from its tensors.

    Modules are the tensor names up to the first dot of the kind's key parts (kohya stems, or
    PEFT module paths); ``parts`` counts each tensor-name part (``lokr_w1``: 72, ``alpha``: 72).
    """
    modules: set[str] = set()
    parts: Counter[str] = Counter()
    for name in shapes:
        module, part = _split_part(name)
        modules.add(module)
        parts[part] += 1
    return {
        "kind": "adapter",
        "format": kind["family"],
        "algorithm": kind["algorithm"],
        "label": kind["label"],
        "supported": False,
        "modules": len(modules),
        "tensors": len(shapes),
        "parameters": sum(_numel(s) for s in shapes.values()),
        "parts": dict(sorted(parts.items())),
        "dtype": sorted(set(dtypes.values())),
        "training": summarize_training(metadata),
        "metadata": metadata,
    }


def _split_part(name: str) -> tuple[str, str]:
    """``lora_unet_x.lokr_w1`` → (``lora_unet_x``, ``lokr_w1``); PEFT ``a.b.lokr_w1.default`` too;
    cloneofsimo ``unet:0:up`` → (``unet:0``, ``up``)."""
    from loratools.formats.detect import KEY_PARTS

    if "." not in name and name.count(":") == 2:
        module, _, part = name.rpartition(":")
        return module, part

    for part in [*KEY_PARTS, "alpha", "lora_up.weight", "lora_B.weight", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                 "lokr_w1_b", "lokr_w2_b", "lokr_t2", "hada_t2", "lora_magnitude_vector"]:  # fmt: skip
        marker = f".{part.removesuffix('.weight')}"
        at = name.find(marker)
        if at > 0:
            return name[:at], name[at + 1 :]
    module, _, part = name.partition(".")
    return module, part


def summarize_gguf(
    kind: dict[str, Any], kv: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], str]]
) -> dict[str, Any]:
    """A GGUF model or LoRA adapter: architecture, tensor count and types, parameters; for an
    adapter also alpha, ranks (rows of each ``.lora_a``) and targets (``attn_q``, ``ffn_up``, …)."""
    types = Counter(t for _, _, t in tensors)
    summary: dict[str, Any] = {
        "kind": kind["kind"],
        "format": "gguf",
        "label": kind["label"],
        "architecture": kv.get("general.architecture"),
        "name": kv.get("general.name"),
        "tensors": len(tensors),
        "parameters": sum(_numel(shape) for _, shape, _ in tensors),
        "tensor_types": dict(types.most_common()),
    }
    if kind["kind"] == "adapter":
        ranks = Counter(shape[0] for name, shape, _ in tensors if name.endswith(".lora_a") and shape)
        targets = sorted({_gguf_target(name) for name, _, _ in tensors if name.endswith(".lora_a")})
        summary.update(
            modules=sum(ranks.values()),
            adapter_type=kv.get("adapter.type"),
            alpha=kv.get("adapter.lora.alpha"),
            ranks={str(r): n for r, n in sorted(ranks.items())},
            target_modules=targets,
        )
    else:
        arch = str(kv.get("general.architecture", ""))
        facts = ("context_length", "block_count", "embedding_length", "attention.head_count")
        summary["config"] = {f: kv[f"{arch}.{f}"] for f in facts if f"{arch}.{f}" in kv}
        summary["file_type"] = kv.get("general.file_type")
    summary["metadata_keys"] = len(kv)
    return summary


def _gguf_target(name: str) -> str:
    """``blk.3.attn_q.weight.lora_a`` → ``attn_q``; ``output.weight.lora_a`` → ``output``."""
    parts = name.removesuffix(".lora_a").removesuffix(".weight").split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
