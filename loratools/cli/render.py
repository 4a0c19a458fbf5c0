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

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["common_prefix", "emit_json", "err", "progress", "sparkline", "table", "warn"]

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
    """A table on stderr; numeric columns right-aligned.

    Nothing is cut at any width (80 columns, a log file): a "module" column loses the prefix
    all its names share (said once under the table), long text folds onto more lines, numbers
    are never folded or elided, and columns that do not fit continue in a second table that
    repeats the first column.
    """
    if quiet:
        return
    budget = max(40, err.width - 1)
    caption = None
    if _natural_width(columns, rows) > budget:  # full names when they fit, else without the prefix
        rows, caption = _strip_common_prefix(columns, rows)
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [bool(rows) and isinstance(rows[0][i], (int, float)) for i in range(len(columns))]
    widths = [
        max([cell_len(c) for c in columns[i].split()] + [cell_len(r[i]) for r in cells])
        for i in range(len(columns))
    ]
    first = min(widths[0], max(12, budget // 3))  # the label column folds beyond a third of the width
    groups = _column_groups([first, *widths[1:]], budget)
    for n, group in enumerate(groups):
        grid = Table(
            title=title if n == 0 else f"{title} (continued)",
            title_justify="left",
            header_style="bold",
            caption=caption if n == len(groups) - 1 else None,
            caption_justify="left",
        )
        for i in [0, *group]:
            if numeric[i]:  # never fold a number: the column is at least as wide as its widest value
                grid.add_column(columns[i], justify="right", overflow="fold", min_width=widths[i])
            else:
                grid.add_column(columns[i], overflow="fold", min_width=min(widths[i], first))
        for row in cells:
            grid.add_row(*(row[i] for i in [0, *group]))
        err.print(grid)


def _natural_width(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
    """Cells a table needs with no folding: every column as wide as its header and widest cell."""
    widths = [max([cell_len(c)] + [cell_len(_cell(r[i])) for r in rows]) for i, c in enumerate(columns)]
    return sum(widths) + 3 * len(widths) + 1


def _column_groups(widths: Sequence[int], budget: int) -> list[list[int]]:
    """Columns 1… packed into tables that each fit ``budget`` cells beside column 0 (each column
    costs its width plus 3 for padding and border)."""
    groups: list[list[int]] = [[]]
    used = widths[0] + 4
    for i in range(1, len(widths)):
        if groups[-1] and used + widths[i] + 3 > budget:
            groups.append([])
            used = widths[0] + 4
        groups[-1].append(i)
        used += widths[i] + 3
    return groups


def common_prefix(names: Sequence[str]) -> str:
    """The longest prefix ending in ``.`` that every name starts with and none equals (in ``_``
    for names without dots: kohya's ``lora_unet_down_blocks_…``)."""
    if len(names) < 2:
        return ""
    first, last = min(names), max(names)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    prefix = first[:n]
    separator = "." if any("." in name for name in names) else "_"
    return prefix[: prefix.rfind(separator) + 1]


def _strip_common_prefix(
    columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[Sequence[Sequence[Any]], str | None]:
    if not rows or columns[0] != "module" or not all(isinstance(r[0], str) for r in rows):
        return rows, None
    prefix = common_prefix([r[0] for r in rows])
    if len(prefix) < 8:  # not worth a caption
        return rows, None
    stripped = [(r[0][len(prefix) :], *r[1:]) for r in rows]
    return stripped, f"module names are shown without their common prefix {prefix}"


def _cell(value: Any) -> str:
    """Floats keep 4 significant digits, scientific when small or large (1.234e-07)."""
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


def escape(text: str) -> str:
    """``text`` with rich markup characters escaped, for user data inside a marked-up line."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)
