"""The figure of ``spectrum --geometry / --intruders``: what fine-tuning did to each weight matrix.

Drawn from the ``spectrum --json`` document, like :mod:`loratools.plot`, whose figure helpers it uses.
"""

from __future__ import annotations

import math
from typing import Any

from loratools.plot import _colors, _figure, _layer_of, _png, _type_of

__all__ = ["plot_geometry"]

PANELS = (("intruders", "intruders"), ("md", "magnitude_direction"), ("rotation", "rotation"))


def plot_geometry(document: dict[str, Any], title: str) -> bytes:
    """Up to three panels, for the measures the document holds: each module's lowest intruder
    similarity as a layer × module-type heatmap (below ε: an intruder; counts in the cells), ΔD
    against ΔM per module (the DoRA paper's Figure 2), and the top-k alignment |⟨u′ᵢ, uᵢ⟩| against i.

    Args:
        document: a ``spectrum --json`` document made with ``--geometry`` and/or ``--intruders``.
        title: what was measured.

    Returns:
        PNG bytes.
    """
    modules = document["modules"]
    panels = [kind for kind, key in PANELS if any(key in m for m in modules)]
    if not panels:
        raise ValueError(
            "the document holds no geometry measures (run spectrum with --geometry or --intruders)"
        )
    figure = _figure(5.2 * len(panels), 4.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    types = sorted({_type_of(m["name"]) for m in modules})
    colors = _colors(types)
    draw = {"intruders": _intruder_heatmap, "md": _magnitude_direction_panel, "rotation": _alignment_panel}
    for ax, kind in zip(axes, panels, strict=True):
        draw[kind](ax, modules, types, colors)
    figure.suptitle(title)
    return _png(figure)


def _layer_order(layer: str) -> tuple[bool, int, str]:
    return (not layer.isdigit(), int(layer) if layer.isdigit() else 0, layer)


def _intruder_heatmap(
    ax: Any, modules: list[dict[str, Any]], types: list[str], colors: dict[str, Any]
) -> None:
    measured = [m for m in modules if "intruders" in m]
    layers = sorted({_layer_of(m["name"]) for m in measured}, key=_layer_order)
    index = {(_layer_of(m["name"]), _type_of(m["name"])): m["intruders"] for m in measured}
    grid = [[min(index[(layer, t)]["similarities"], default=math.nan) if (layer, t) in index else math.nan
             for t in types] for layer in layers]  # fmt: skip
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    epsilon, k = measured[0]["intruders"]["epsilon"], measured[0]["intruders"]["k"]
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.set_label(f"lowest max|⟨u′ⱼ, uᵢ⟩| over top-{k} (red line: ε = {epsilon:g})")
    colorbar.ax.axhline(epsilon, color="red", linewidth=1.5)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title("Intruder dimensions (count per cell)")
    if len(layers) * len(types) <= 160:
        for (layer, t), found in index.items():
            row, col = layers.index(layer), types.index(t)
            ax.text(col, row, found["count"], ha="center", va="center", color="white", fontsize=8)


def _magnitude_direction_panel(
    ax: Any, modules: list[dict[str, Any]], types: list[str], colors: dict[str, Any]
) -> None:
    for t in types:
        points = [
            m["magnitude_direction"]
            for m in modules
            if "magnitude_direction" in m and _type_of(m["name"]) == t
        ]
        ax.scatter(
            [p["delta_m"] for p in points], [p["delta_d"] for p in points], s=18, color=colors[t], label=t
        )
    ax.set_xlabel("ΔM: mean |‖W′ⁿ‖ − ‖W0ⁿ‖| over output rows n")
    ax.set_ylabel("ΔD: mean (1 − cos(W′ⁿ, W0ⁿ))")
    ax.set_title("Magnitude vs direction change (DoRA, Fig. 2)")
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=7, loc="best")


def _alignment_panel(
    ax: Any, modules: list[dict[str, Any]], types: list[str], colors: dict[str, Any]
) -> None:
    for t in types:
        rows = [m["rotation"]["alignment"] for m in modules if "rotation" in m and _type_of(m["name"]) == t]
        for i, alignment in enumerate(rows):
            index = range(1, len(alignment) + 1)
            ax.plot(index, alignment, color=colors[t], alpha=0.45, linewidth=1, label=t if i == 0 else None)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("i (singular direction, by σ)")
    ax.set_ylabel("|⟨u′ᵢ, uᵢ⟩| (1: kept, 0: rotated away)")
    ax.set_title("Alignment of top singular vectors")
    ax.legend(fontsize=7, loc="best")
