"""Everything the user sees: JSON on stdout, tables, warnings and progress bars on stderr.

This is the only module that imports rich. Progress bars are drawn only on a terminal and not
with ``--quiet``; ``--json`` output is exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["emit_json", "err", "progress", "sparkline", "table", "warn"]

err = Console(stderr=True, highlight=False)
SPARKS = "▁▂▃▄▅▆▇█"


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (NaN/inf become null)."""
    sys.stdout.write(json.dumps(_finite(document), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)


def note(message: str) -> None:
    err.print(message, soft_wrap=True)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, quiet: bool = False) -> None:
    """A table on stderr; numeric columns right-aligned."""
    if quiet:
        return
    grid = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][i], (int, float))
        grid.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        grid.add_row(*(_cell(v) for v in row))
    err.print(grid)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sparkline(values: Sequence[float]) -> str:
    """Values in [0, 1] as block characters, e.g. a normalised spectrum."""
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, round(v * (len(SPARKS) - 1))))] for v in values)


@contextmanager
def progress(total: int, description: str, *, quiet: bool = False) -> Iterator[Any]:
    """A progress bar on stderr; yields ``advance(name)`` to call once per unit of work."""
    if quiet or not err.is_terminal:
        yield lambda _name: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total, item="")

        def advance(name: str) -> None:
            bar.update(task, advance=1, item=name)

        yield advance
