"""``loratools resize ADAPTER -o OUT (-r RANK | --energy F | --budget N)``: optimal lower ranks."""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting, split_option
from loratools.commands.resize import ResizeOptions


@click.command()
@click.argument("adapter")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Adapter folder to write (PEFT), or NAME.safetensors for a kohya file.",
)
@click.option("-r", "--rank", type=int, help="Maximum rank of every module.")
@click.option("--energy", type=float, help="Keep at least this fraction (0–1] of each module's energy.")
@click.option("--budget", type=int, help="Total rank over all modules, placed by model-wide singular values.")
@click.option(
    "--min-rank",
    type=int,
    default=ResizeOptions.min_rank,
    show_default=True,
    help="With --budget: rank every module keeps.",
)
@click.option(
    "--base",
    metavar="BASE",
    help="Base model: turns a kohya file's module names into dotted paths (needed for PEFT output).",
)
@split_option
@dtype_option
@device_option
@force_flag
@reporting
def resize(
    adapter: str, output: Path, rank: int | None, energy: float | None, budget: int | None, min_rank: int,
    base: str | None, split: str, dtype: str | None, device: str, force: bool, as_json: bool, quiet: bool,
) -> None:  # fmt: skip
    """Lower ADAPTER's ranks by a truncated SVD of each module's s·B·A (never forming it).

    \b
    loratools resize a/ -o a8/ -r 8            every module at most rank 8
    loratools resize a/ -o a99/ --energy 0.99  keep ≥ 99% of each module's ‖ΔW‖²_F
    loratools resize a/ -o ab/ --budget 256    256 ranks in total, where they matter most
    """
    from loratools.commands.resize import open_resize

    options = ResizeOptions(
        adapter, output, rank=rank, energy=energy, budget=budget, min_rank=min_rank, split=split,
        base=base, dtype=dtype, device=device, force=force,
    )  # fmt: skip
    opened = open_resize(options)
    with render.progress(opened.total, "resize", quiet=quiet or as_json) as advance:
        report = opened.run(advance)
    if not (quiet or as_json):  # after the work: a refusal stays the only line on stderr
        render.note(report.description)
    if as_json:
        render.emit_json(report.to_dict())
        return
    result = report.result
    rows = [(m.name, m.rank_before, m.rank, m.energy_kept) for m in result.modules]
    render.table("resize", ["module", "rank before", "rank", "energy kept"], rows, quiet=quiet)
    if not quiet:
        render.note(
            f"wrote {report.output}: total rank {result.rank_total_before} → {result.rank_total}, "
            f"min energy kept {result.min_energy_kept:.4f}"
        )
