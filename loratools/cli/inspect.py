"""``loratools inspect PATH``: what is in a checkpoint or an adapter."""

from __future__ import annotations

import json
from typing import Any

import click

from loratools.cli import render
from loratools.cli.options import reporting

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
    from loratools.commands.inspect import InspectOptions
    from loratools.commands.inspect import inspect as run

    report = run(InspectOptions(path, base))
    if as_json:
        render.emit_json(report.to_dict())
        return
    if quiet:
        return
    render.note(f"{path}: {report.label}")
    summary = report.to_dict()  # the summary table lists the document's fields, as --json has them
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


def _dora_rows(dora: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for m in dora["magnitude"]:
        change = m.get("relative_change")
        shift = f"{change['mean']:+.4f} (max |·| {change['max_abs']:.4f})" if change else "(pass --base)"
        rows.append((m["name"], f"{m['min']:.4g}", f"{m['mean']:.4g}", f"{m['max']:.4g}", shift))
    return rows


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
