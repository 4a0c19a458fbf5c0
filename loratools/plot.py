"""Figures of spectra and subspace similarity, as PNG bytes (matplotlib, the ``plot`` extra).

The functions take the JSON documents that ``loratools spectrum --json`` and ``loratools
similarity --json`` print, so a saved report can be plotted later. Drawing uses matplotlib's
object API on an Agg canvas — no pyplot, no global backend state, no display needed. matplotlib
is imported only when a figure is drawn; without it, :class:`~loratools.errors.MissingExtra`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from loratools.errors import MissingExtra

__all__ = ["plot_similarity", "plot_spectrum", "require_matplotlib"]

LEVEL = "0.9"  # the effective rank shown in the heatmap
PREFERRED_TYPES = ("q_proj", "v_proj", "k_proj", "o_proj", "query", "value", "c_attn")


def require_matplotlib() -> None:
    """Fail early, before long work, when a plot was asked for and matplotlib is missing.

    Raises:
        MissingExtra: matplotlib is not installed.
    """
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules
        found = False
    if not found:
        raise MissingExtra("matplotlib", "plot", "--plot")


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas."""
    try:
        import matplotlib  # noqa: F401  (first, so a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra("matplotlib", "plot", "--plot") from exc
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _type_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _colors(types: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {t: palette(i % 10) for i, t in enumerate(types)}


# -- spectra ----------------------------------------------------------------------------------
def plot_spectrum(document: dict[str, Any], title: str) -> bytes:
    """Three panels: normalised spectra σᵢ/σ₁ and energy kept e(r) per module (coloured by module
    type), and a layer × module-type heatmap of the effective rank at 90% energy.

    Args:
        document: a ``spectrum --json`` document.
        title: what was measured (shown as the figure title).

    Returns:
        PNG bytes.
    """
    modules = document["modules"]
    figure = _figure(16, 5.2)
    axes = figure.subplots(1, 3, width_ratios=[1, 1, 1.1])
    types = list(dict.fromkeys(_type_of(m["name"]) for m in modules))
    colors = _colors(types)
    _spectra_panel(axes[0], modules, colors)
    _energy_panel(axes[1], modules, colors)
    _rank_heatmap(axes[2], document["summary"]["by_layer"], modules, types)
    figure.suptitle(title, fontsize=13)
    return _png(figure)


def _spectra_panel(ax: Any, modules: list[dict[str, Any]], colors: dict[str, Any]) -> None:
    alpha = max(0.25, min(1.0, 8 / max(1, len(modules))))
    for m in modules:
        s = m["singular_values"]
        if not s or s[0] <= 0:
            continue
        marker = "o" if len(s) < 3 else None  # a one-value spectrum is a point, not a line
        color = colors[_type_of(m["name"])]
        ax.plot(range(1, len(s) + 1), [v / s[0] for v in s], color=color, alpha=alpha, lw=1, marker=marker)
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i of the singular value")
    ax.set_ylabel(r"$\sigma_i\,/\,\sigma_1$ (normalised)")
    ax.set_title("Normalised singular values per module")
    ax.grid(True, which="both", alpha=0.3)
    _type_legend(ax, colors)


def _energy_panel(ax: Any, modules: list[dict[str, Any]], colors: dict[str, Any]) -> None:
    alpha = max(0.25, min(1.0, 8 / max(1, len(modules))))
    for m in modules:
        total = m["frobenius_norm"] ** 2
        if total <= 0:
            continue
        curve, running = [], 0.0
        for v in m["singular_values"]:
            running += v * v
            curve.append(running / total)
        ax.plot(range(1, len(curve) + 1), curve, color=colors[_type_of(m["name"])], alpha=alpha, lw=1)
    for level, style in ((0.9, "--"), (0.99, ":")):
        ax.axhline(level, color="black", ls=style, lw=0.8, label=f"{level:.0%} energy")
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, … not 2⁰, 2¹, …
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel(r"energy kept  $\Sigma_{i \leq r}\,\sigma_i^2 \,/\, \Vert\Delta\Vert_F^2$")
    ax.set_title("Energy a rank-r approximation keeps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _type_legend(ax: Any, colors: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([0], [0], color=c, lw=2, label=t) for t, c in colors.items()]
    ax.legend(handles=handles, title="module type", fontsize=8, title_fontsize=8, loc="lower left")


def _rank_heatmap(ax: Any, by_layer: dict[str, Any], modules: list[dict[str, Any]], types: list[str]) -> None:
    layers = list(by_layer)
    index = {(_layer_of(m["name"]), _type_of(m["name"])): m["effective_rank"][LEVEL] for m in modules}
    grid = [[index.get((layer, t)) for t in types] for layer in layers]
    values = [[math.nan if v is None else v for v in row] for row in grid]
    top = max([v for row in grid for v in row if v is not None], default=1)
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=top)
    figure = ax.get_figure()
    from matplotlib.ticker import MaxNLocator

    bar = figure.colorbar(image, ax=ax, label=f"effective rank at {float(LEVEL):.0%} energy")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    step = max(1, len(layers) // 24)  # keep row labels legible on deep models
    for label in ax.get_yticklabels()[1::step] if step > 1 else []:
        label.set_visible(False)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    unknown = any(v is None for v in index.values())
    note = "\n(?: beyond the computed top-k singular values)" if unknown else ""
    ax.set_title(f"Effective rank at {float(LEVEL):.0%} energy{note}")
    if len(layers) * len(types) <= 160:
        for row, cells in enumerate(grid):
            for col, value in enumerate(cells):
                text = "?" if value is None and (layers[row], types[col]) in index else value
                if text is not None:
                    light = value is None or value > 0.6 * top  # dark text on bright or empty cells
                    color = "black" if light else "white"
                    ax.text(col, row, str(text), ha="center", va="center", color=color, fontsize=8)


def _layer_of(name: str) -> str:
    for part in name.split(".")[:-1]:
        if part.isdigit():
            return part
    return "-"


# -- similarity -------------------------------------------------------------------------------
def plot_similarity(document: dict[str, Any], title: str, *, labels: tuple[str, str] = ("1", "2")) -> bytes:
    """Figure-3-style heatmaps of φ(i, j): one column per shown module, the full grid on top and
    the top-left 8×8 corner below when either rank exceeds 8.

    Shows every module when there are at most four, else the middle layer's module of each of the
    first four module types.

    Args:
        document: a ``similarity --json`` document.
        title: what was measured.
        labels: short names of ADAPTER_1 and ADAPTER_2 for the axis labels.

    Returns:
        PNG bytes.
    """
    shown = _pick_modules(document["modules"])
    zoom = any(max(m["ranks"]) > 8 for m in shown)
    rows = 2 if zoom else 1
    figure = _figure(4.2 * len(shown) + 1, 3.8 * rows + 0.6)
    axes = figure.subplots(rows, len(shown), squeeze=False)
    for col, m in enumerate(shown):
        _phi_panel(axes[0][col], m["phi"], labels, m["name"])
        if zoom:
            corner = [row[:8] for row in m["phi"][:8]]
            _phi_panel(axes[1][col], corner, labels, f"{m['name']}: i, j ≤ 8")
    total = len(document["modules"])
    shown_of = (
        f"\n{len(shown)} of {total} modules shown (the middle layer of each type)"
        if len(shown) < total
        else ""
    )
    figure.suptitle(title + shown_of, fontsize=12)
    return _png(figure)


def _pick_modules(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(modules) <= 4:
        return modules
    by_type: dict[str, list[dict[str, Any]]] = {}
    for m in modules:
        by_type.setdefault(_type_of(m["name"]), []).append(m)
    first = [t for t in PREFERRED_TYPES if t in by_type]  # the paper's W_q, W_v first
    order = first + [t for t in by_type if t not in first]
    return [by_type[t][len(by_type[t]) // 2] for t in order[:4]]


def _phi_panel(ax: Any, phi: list[list[float]], labels: tuple[str, str], name: str) -> None:
    """One φ heatmap, its colours scaled to this grid's own range (stated on the colour bar): a
    fixed 0–1 scale shows real adapters, whose φ often stays below 0.2, as one flat colour."""
    from matplotlib.ticker import MaxNLocator

    rows, cols = len(phi), len(phi[0])
    values = [v for row in phi for v in row]
    low, high = min(values), max(values)
    if high - low < 1e-6:  # a flat grid still needs a non-empty colour range
        low, high = max(0.0, low - 0.05), min(1.0, high + 0.05)
    extent = (0.5, cols + 0.5, rows + 0.5, 0.5)  # cell (i, j) centred on integer i, j from 1
    image = ax.imshow(
        phi, vmin=low, vmax=high, cmap="viridis", aspect="auto", extent=extent, interpolation="nearest"
    )
    ax.get_figure().colorbar(image, ax=ax, label=f"φ(i, j), colours span {low:.3g}–{high:.3g}")
    ax.set_xlabel(f"j: top-j directions of {labels[1]}")
    ax.set_ylabel(f"i: top-i directions of {labels[0]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"module {name}", fontsize=9, wrap=True)
