"""``loratools combine ADAPTER... -o OUT``: weighted sums of adapters (exact, svd, ties, dare)."""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting, split_option
from loratools.commands.combine import CombineOptions, CombineReport
from loratools.ops.combine.methods import METHODS


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Adapter folder to write (PEFT), or NAME.safetensors for a kohya file.",
)
@click.option(
    "-w",
    "--weight",
    "weights",
    type=float,
    multiple=True,
    help="One per adapter, in order (default 1 each): -1 negates, 0.5 halves.",
)
@click.option("-r", "--rank", type=int, help="Output rank per module (svd, ties, dare).")
@click.option(
    "--energy", type=float, help="Instead of -r: keep at least this fraction of each module's energy."
)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + ".",
)
@click.option("--density", type=float, help="ties: fraction of entries kept; dare: keep probability.")
@click.option(
    "--seed",
    type=int,
    default=CombineOptions.seed,
    show_default=True,
    help="Seed of DARE's masks and the randomized SVD.",
)
@click.option(
    "--base",
    metavar="BASE",
    help="Base model: turns a kohya file's module names into dotted paths (needed for PEFT output).",
)
@split_option
@click.option(
    "--saved-modules",
    type=click.Choice(["auto", "drop", "first"]),
    default=CombineOptions.saved_modules,
    show_default=True,
    help="modules_to_save: keep when unweighted and identical (auto), keep the first copy, or drop.",
)
@dtype_option
@device_option
@force_flag
@reporting
def combine(
    adapters: tuple[str, ...], output: Path, weights: tuple[float, ...], rank: int | None,
    energy: float | None, method: str | None, density: float | None, seed: int, base: str | None, split: str,
    saved_modules: str, dtype: str | None, device: str, force: bool, as_json: bool, quiet: bool,
) -> None:  # fmt: skip
    """Combine ADAPTERs into one: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ, exactly or at rank -r.

    \b
    loratools combine a/ b/ -o sum/                      exact sum, rank r_a + r_b
    loratools combine a/ b/ -o ab/ -w 0.7 -w 0.3 -r 16   optimal rank-16 weighted sum
    loratools combine a/ -o minus_a/ -w -1               negation (scaling: -w 0.5)
    loratools combine a/ b/ c/ -o t/ --method ties --density 0.2 -r 16
    """
    from loratools.commands.combine import open_combine

    options = CombineOptions(
        adapters, output, weights=weights or None, method=method, rank=rank, energy=energy,
        density=density, seed=seed, split=split, saved_modules=saved_modules, base=base,
        dtype=dtype, device=device, force=force,
    )  # fmt: skip
    opened = open_combine(options)
    with render.progress(opened.total, "combine", quiet=quiet or as_json) as advance:
        report = opened.run(advance)
    if not (quiet or as_json):  # after the work: a refusal stays the only line on stderr
        for line in report.descriptions:
            render.note(line)
    _report(report, as_json, quiet)


def _report(report: CombineReport, as_json: bool, quiet: bool) -> None:
    if as_json:
        render.emit_json(report.to_dict())
        return
    result = report.result
    rows = [(m.name, m.rank, m.energy_kept, len(m.sources)) for m in result.modules]
    render.table(f"combine ({result.method})", ["module", "rank", "energy kept", "inputs"], rows, quiet=quiet)
    if result.saved_dropped:
        render.warn(f"dropped modules_to_save: {', '.join(result.saved_dropped)}")
    if not quiet:
        render.note(f"wrote {report.output} ({len(rows)} modules, total rank {result.rank_total})")
