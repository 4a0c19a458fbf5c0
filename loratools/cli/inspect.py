"""``loratools inspect PATH``: what is in a checkpoint or an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from loratools.cli import render
from loratools.cli.options import reporting
from loratools.formats.detect import is_kohya_stem

SHORT_METADATA = 4  # metadata entries shown in the table; more are counted, and all go to --json


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{size:.1f} TB"


@click.command()
@click.argument("path")
@click.option("--base", help="Base checkpoint: resolves a kohya adapter's module names against its tensors.")
@reporting
def inspect(path: str, base: str | None, as_json: bool, quiet: bool) -> None:
    """Summarise PATH: an adapter (PEFT, kohya/LyCORIS, GGUF) or a model (file, folder, sharded,
    .bin, GGUF, Hub id). Long metadata is summarised; --json prints all of it."""
    summary = _summary(path, base)
    if as_json:
        render.emit_json(summary)
        return
    if quiet:
        return
    render.note(f"{path}: {summary['label']}")
    rows = [(key, _show(key, value)) for key, value in summary.items() if _shown(key, value)]
    render.table("summary", ["field", "value"], rows)
    for label, line in summary.get("training", {}).items():
        render.note(f"  training {label}: {line}")
    if "dora" in summary:
        columns = ["module", "m min", "m mean", "m max", "m / ‖W0‖ − 1"]
        render.table(
            f"DoRA magnitude ({summary['dora']['modules']} modules)", columns, _dora_rows(summary["dora"])
        )
    if summary.get("lycoris_modules"):
        modules = [
            (name, m["kind"], str(m["dim"] or "full"), f"{m['alpha']:g}", f"{m['scale']:g}",
             " ".join(f"{part} {tuple(shape)}" for part, shape in m["factors"].items()))
            for name, m in summary["lycoris_modules"].items()
        ]  # fmt: skip
        render.table("LoHa/LoKr modules", ["module", "kind", "dim", "alpha", "scale", "factors"], modules)
    metadata = summary.get("metadata") or {}
    if len(metadata) > SHORT_METADATA or any(len(str(v)) > 80 for v in metadata.values()):
        render.note(f"{len(metadata)} metadata entries, summarised above; all of them with --json")


def _summary(path: str, base: str | None) -> dict[str, Any]:
    """Detect what PATH is (one detector for every command) and summarise it."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    local = resolve_path(path)
    kind = detect_path(local)
    if kind.family == "gguf":
        summary = _gguf(local, kind.to_dict())
    elif kind.kind == "checkpoint":
        summary = _checkpoint(local)
    elif kind.supported:
        summary = _adapter(local, kind.family, base)
    else:
        summary = _unsupported(local, kind.to_dict())
    return {"label": kind.label, "algorithm": kind.algorithm, **summary}


def _gguf(local: Path, kind: dict[str, Any]) -> dict[str, Any]:
    from loratools.io.filekind import read_gguf_header
    from loratools.ops.inspect import summarize_gguf

    header = read_gguf_header(local)
    return {**summarize_gguf(kind, header.kv, header.tensors), "path": str(local)}


def _checkpoint(local: Path) -> dict[str, Any]:
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.inspect import summarize_checkpoint

    ckpt = open_checkpoint(local)
    config_file = local / "config.json" if local.is_dir() else None
    config = json.loads(config_file.read_text()) if config_file and config_file.is_file() else None
    return summarize_checkpoint(ckpt, config, _tokenizer(local))


def _tokenizer(local: Path) -> dict[str, Any] | None:
    """tokenizer.json beside the weights (for its added tokens), or None when absent or unreadable."""
    path = local / "tokenizer.json" if local.is_dir() else None
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _adapter(local: Path, family: str, base: str | None) -> dict[str, Any]:
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


def _dora_with_base(adapter: Any, ckpt: Any) -> dict[str, Any]:
    """DoRA magnitude statistics with the change m / ‖W0‖_row − 1 against the base's weights."""
    from loratools.formats.names import resolve_modules
    from loratools.ops.dora import dora_summary

    targets = resolve_modules(adapter.modules, ckpt.names())
    return dora_summary(adapter, lambda module: ckpt.get(targets[module]))


def _dora_rows(dora: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for m in dora["magnitude"]:
        change = m.get("relative_change")
        shift = f"{change['mean']:+.4f} (max |·| {change['max_abs']:.4f})" if change else "(pass --base)"
        rows.append((m["name"], f"{m['min']:.4g}", f"{m['mean']:.4g}", f"{m['max']:.4g}", shift))
    return rows


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


def _shown(key: str, value: object) -> bool:
    """Rows of the table: training settings are shown apart, and metadata only when short (a
    kohya file carries hundreds of entries: --json has them all)."""
    if key == "metadata" and isinstance(value, dict):
        return 0 < len(value) <= SHORT_METADATA and all(len(str(v)) <= 80 for v in value.values())
    return key not in ("training", "label", "dora", "lycoris_modules") and value not in (None, {}, [])


def _show(key: str, value: object) -> str:
    if key == "bytes" and isinstance(value, int):
        return _human_bytes(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
