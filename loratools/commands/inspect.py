"""``loratools inspect PATH [--base BASE]``: what a checkpoint or an adapter holds.

Paths around the pure summaries of :mod:`loratools.ops.inspect`: the path is resolved and named by
the one detector (:func:`loratools.io.filekind.detect_path`), then read as a GGUF header, a
checkpoint (with its folder's config.json and tokenizer.json), an adapter loratools loads (with
a base: kohya names resolved, DoRA magnitudes against the base rows), or an adapter it only names.
Nothing is written; the summary is read from headers and small adapter files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when the command runs: --help stays instant
    from loratools.adapter import Adapter
    from loratools.io.checkpoint import Checkpoint

__all__ = ["InspectOptions", "InspectReport", "inspect"]


@dataclass(frozen=True)
class InspectOptions:
    """What to inspect.

    Attributes:
        path: a checkpoint or adapter path, or a Hub id.
        base: a base checkpoint: resolves a kohya adapter's module names and gives DoRA
            magnitudes their change against the base rows (optional).
    """

    path: str
    base: str | None = None


@dataclass(frozen=True)
class InspectReport:
    """What PATH is and what it holds; ``to_dict()`` is the ``--json`` document.

    Attributes:
        path: the argument, as given.
        label: what the detector calls it ("a kohya LoKr adapter", "a GGUF model (llama, Q4_1)").
        algorithm: the adapter algorithm (LoRA, DoRA, LoHa, …), or None for a model.
        summary: the fields :mod:`loratools.ops.inspect` gives for this kind of file.
    """

    path: str
    label: str
    algorithm: str | None
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "algorithm": self.algorithm, **self.summary}


def inspect(options: InspectOptions) -> InspectReport:
    """Detect what ``options.path`` is (one detector for every command) and summarise it.

    Raises:
        LoratoolsError: a missing path, an unreadable file, or a base that does not fit.
    """
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    local = resolve_path(options.path)
    kind = detect_path(local)
    if kind.family == "gguf":
        summary = _gguf(local, kind.to_dict())
    elif kind.kind == "checkpoint":
        summary = _checkpoint(local)
    elif kind.supported:
        summary = _adapter(local, kind.family, options.base)
    else:
        summary = _unsupported(local, kind.to_dict())
    return InspectReport(options.path, kind.label, kind.algorithm, summary)


def _gguf(local: Path, kind: dict[str, Any]) -> dict[str, Any]:
    from loratools.io.filekind import read_gguf_header
    from loratools.ops.inspect import summarize_gguf

    header = read_gguf_header(local)
    return {**summarize_gguf(kind, header.kv, header.tensors), "path": str(local)}


def _checkpoint(local: Path) -> dict[str, Any]:
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.model_config import read_json_object
    from loratools.ops.inspect import summarize_checkpoint

    ckpt = open_checkpoint(local)
    if not local.is_dir():  # a single weights file: no folder to read config.json or a tokenizer from
        return summarize_checkpoint(ckpt, None, None)
    # tokenizer.json for its added tokens; either file may be absent or unreadable (None then)
    config, tokenizer = read_json_object(local / "config.json"), read_json_object(local / "tokenizer.json")
    return summarize_checkpoint(ckpt, config, tokenizer)


def _adapter(local: Path, family: str, base: str | None) -> dict[str, Any]:
    from loratools.formats.detect import is_kohya_stem
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.io.safetensors_file import SafetensorsFile
    from loratools.ops.inspect import summarize_adapter, summarize_training
    from loratools.ops.moe import adapter_experts

    ckpt = open_checkpoint(resolve_path(base)) if base else None
    shapes = {i.name: tuple(i.shape) for i in ckpt.infos()} if ckpt is not None else None  # fused experts
    adapter = load_adapter(local, base_names=ckpt.names() if ckpt is not None else None, base_shapes=shapes)
    summary = summarize_adapter(adapter, family)
    experts = adapter_experts(adapter.weights, shapes)
    if experts is not None:
        summary["experts"] = experts
    if ckpt is not None and "dora" in summary:
        summary.update(_dora_with_base(adapter, ckpt))
    if family == "kohya":
        metadata = SafetensorsFile(local).metadata
        summary["training"] = summarize_training(dict(metadata))
        summary["metadata"] = dict(metadata)
        if base is None and adapter.weights and all(is_kohya_stem(m) for m in adapter.weights):
            summary["module_names"] = "kohya names as in the file (pass --base to resolve them)"
    return summary


def _dora_with_base(adapter: Adapter, ckpt: Checkpoint) -> dict[str, Any]:
    """DoRA magnitude statistics with the change m / ‖W0‖_row − 1 against the base's weights."""
    from loratools.formats.names import resolve_modules
    from loratools.ops.dora import dora_summary

    targets = resolve_modules(adapter.modules, ckpt.names())
    return dora_summary(adapter, lambda module: ckpt.get(targets[module]))


def _unsupported(local: Path, kind: dict[str, Any]) -> dict[str, Any]:
    from loratools.io.safetensors_file import SafetensorsFile
    from loratools.ops.inspect import summarize_adapter_tensors

    weights = local / "adapter_model.safetensors" if local.is_dir() else local
    st = SafetensorsFile(weights)
    shapes = {n: tuple(i.shape) for n, i in st.infos.items()}
    dtypes = {n: str(i.dtype).removeprefix("torch.") for n, i in st.infos.items()}
    summary = summarize_adapter_tensors(kind, shapes, dtypes, dict(st.metadata))
    summary["note"] = f"{kind['label']}: loratools names it but does not load it yet"
    return summary
