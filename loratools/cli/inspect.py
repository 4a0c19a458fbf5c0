"""``loratools inspect PATH``: what is in a checkpoint or an adapter."""

from __future__ import annotations

import json

import click

from loratools.cli import render
from loratools.cli.options import json_flag


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
@json_flag
def inspect(path: str, base: str | None, as_json: bool) -> None:
    """Summarise PATH: a checkpoint (file, model folder, sharded folder, Hub id) or an adapter."""
    from loratools.errors import UnknownFormat
    from loratools.io.adapter_dir import adapter_format, load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.ops.inspect import summarize_adapter, summarize_checkpoint

    local = resolve_path(path)
    try:
        fmt = adapter_format(local)
    except UnknownFormat:
        fmt = None
    if fmt is not None:
        base_names = open_checkpoint(resolve_path(base)).names() if base else None
        summary = summarize_adapter(load_adapter(local, base_names=base_names), fmt)
    else:
        ckpt = open_checkpoint(local)
        config_file = local / "config.json" if local.is_dir() else None
        config = json.loads(config_file.read_text()) if config_file and config_file.is_file() else None
        summary = summarize_checkpoint(ckpt, config)
    if as_json:
        render.emit_json(summary)
        return
    rows = [(key, _show(key, value)) for key, value in summary.items() if value not in (None, {}, [])]
    render.table(f"{path}", ["field", "value"], rows)


def _show(key: str, value: object) -> str:
    if key == "bytes" and isinstance(value, int):
        return _human_bytes(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
