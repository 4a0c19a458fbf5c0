"""``loratools similarity ADAPTER_1 ADAPTER_2``: do two adapters learn the same directions? (§7.2)"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from loratools.cli import render
from loratools.cli.options import reporting
from loratools.commands.similarity import SimilarityOptions

if TYPE_CHECKING:
    from loratools.commands.similarity import SimilarityReport


@click.command()
@click.argument("first", metavar="ADAPTER_1")
@click.argument("second", metavar="ADAPTER_2")
@click.option(
    "--side",
    type=click.Choice(["right", "left"]),
    default=SimilarityOptions.side,
    show_default=True,
    help="right: right singular vectors of A (the paper); left: left singular vectors of B.",
)
@click.option(
    "--threshold",
    default=SimilarityOptions.threshold,
    show_default=True,
    help="cos² above which a direction is shared.",
)
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw φ heatmaps to FILE.png."
)
@click.option("--force", is_flag=True, help="Replace the --plot FILE if it exists.")
@click.option(
    "--base",
    metavar="BASE",
    help="Base model: resolves kohya module names, so a kohya file compares with a PEFT one.",
)
@reporting
def similarity(
    first: str,
    second: str,
    side: str,
    threshold: float,
    plot_path: str | None,
    force: bool,
    base: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Subspace similarity φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j) per shared module.

    φ is 1 when the top-i directions of ADAPTER_1 lie inside the top-j of ADAPTER_2, and 0 when
    they are orthogonal; the ranks may differ (r = 8 vs r = 64, as in the paper's Figure 3).
    """
    from loratools.cli.spectrum import check_plot_output
    from loratools.commands.similarity import open_similarity

    options = SimilarityOptions(first, second, side=side, threshold=threshold, base=base)
    plot_path = check_plot_output(plot_path, force, [first, second])
    opened = open_similarity(options)
    with render.progress(opened.total, "similarity", quiet=quiet) as advance:
        report = opened.run(advance)
    if not (quiet or as_json):  # after the work: a refusal stays the only line on stderr
        for line in report.descriptions:
            render.note(line)
    if plot_path:
        _write_plot(report, plot_path, force)
    if as_json:
        render.emit_json(report.to_dict())
    elif not quiet:
        _show(report)


def _write_plot(report: SimilarityReport, plot_path: str, force: bool) -> None:
    from loratools.io.writer import atomic_output
    from loratools.plot import plot_similarity

    first, second = (Path(p).name or p for p in report.adapters)
    side = report.result.options.side
    vectors = "right singular vectors of A" if side == "right" else "left singular vectors of B"
    title = f"Subspace similarity φ(i, j) between {first} (i) and {second} (j), {vectors}"
    # the figure reads the --json shape, which is also what `plot` is tested against
    png = plot_similarity(report.to_dict(), title, labels=(first, second))
    with atomic_output(plot_path, force=force) as temporary:
        temporary.write_bytes(png)


def _show(report: SimilarityReport) -> None:
    from loratools.cli.spectrum import row_labels

    result = report.result
    t = result.options.threshold
    labels = row_labels([m.name for m in result.modules])
    rows = []
    for m in result.modules:
        diagonal = m.diagonal
        rows.append((labels[m.name], "×".join(map(str, m.phi.shape)), diagonal[0], diagonal[-1],
                     render.sparkline(diagonal[:24]), m.random_phi(*m.phi.shape), m.shared_directions(t)))  # fmt: skip
    columns = [
        "module",
        "r₁×r₂",
        "φ(1,1)",
        "φ(r,r)",
        "φ(i,i), i = 1…",
        "random φ(r₁,r₂)",
        f"shared (cos²>{t})",
    ]
    render.table(
        f"Subspace similarity ({result.options.side} side): {' vs '.join(report.adapters)}", columns, rows
    )
    summary = result.summary()
    groups = {**summary["by_type"], "all": summary["model"]}
    summary_rows = [(name, g["modules"], g["mean_diagonal"][0], render.sparkline(g["mean_diagonal"][:24]),
                     g["shared_directions_mean"], g["shared_directions_min"]) for name, g in groups.items()]  # fmt: skip
    columns = ["module type", "modules", "mean φ(1,1)", "mean φ(i,i)", "shared (mean)", "shared (min)"]
    render.table("Summary", columns, summary_rows)
    for names, label in ((result.only_in_first, "ADAPTER_1"), (result.only_in_second, "ADAPTER_2")):
        if names:
            render.note(f"{len(names)} modules only in {label} (not compared): {names[:4]}")
