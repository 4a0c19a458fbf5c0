"""``loratools extract BASE FINETUNED -r RANK -o OUT``: a full fine-tune → a PEFT LoRA adapter."""

from __future__ import annotations

import os
from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting, split_option
from loratools.commands.extract import ExtractOptions, ExtractReport


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter folder to create."
)
@click.option("-r", "--rank", type=int, help="The same rank for every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖².")
@click.option("--sv-threshold", type=float, help="Per module, keep every singular value ≥ this.")
@click.option("--budget", type=int, help="Total rank over all modules, given to the largest σ model-wide.")
@click.option("--max-rank", type=int, help="Rank cap with --energy/--sv-threshold/--budget [default: 64].")
@click.option(
    "--targets", multiple=True, help="Leaf names (q_proj,v_proj) or one regex [default: all linears]."
)
@click.option("--exact", is_flag=True, help="Full SVD instead of the randomized one.")
@split_option
@click.option("--alpha", type=float, help="LoRA alpha for every module [default: alpha = rank, scale 1].")
@click.option("--modules-to-save", is_flag=True, help="Carry changed norms/biases/other weights in full.")
@click.option("--include-embeddings", is_flag=True, help="Carry changed embeddings and lm_head in full.")
@click.option(
    "--embeddings",
    type=click.Choice(["skip", "full", "lora"]),
    default=ExtractOptions.embeddings,
    show_default=True,
    help="Changed embeddings and lm_head: report them, carry them whole, or factor them as LoRA.",
)
@click.option(
    "--seed", type=int, default=ExtractOptions.seed, show_default=True, help="Seed of the randomized SVD."
)
@click.option(
    "--dora", is_flag=True, help="A DoRA adapter (magnitude + rank-r direction) instead of plain LoRA."
)
@dtype_option
@device_option
@force_flag
@reporting
def extract(base: str, finetuned: str, output: Path, as_json: bool, quiet: bool, **flags: object) -> None:
    """Extract a LoRA adapter from FINETUNED, a full fine-tune of BASE: ΔW ≈ (alpha/r)·B·A by truncated SVD.

    Runs under `torchrun --nproc-per-node N` too: the modules are shared, rank 0 writes.
    """
    from loratools.commands.extract import open_extract

    # torchrun's RANK / WORLD_SIZE: the CLI is the only environment reader
    opened = open_extract(ExtractOptions(base, finetuned, output, env=os.environ, **flags))  # type: ignore[arg-type]
    with render.progress(opened.total, "extract", quiet=quiet or not opened.is_main) as advance:
        report = opened.run(advance)
    if report is not None:  # None: another torchrun process (rank 0 writes and reports)
        _render(report, as_json, quiet)


def _render(report: ExtractReport, as_json: bool, quiet: bool) -> None:
    result = report.result
    skipped = list(result.skipped.items())
    if skipped:
        shown = ", ".join(f"{name} ({reason})" for name, reason in skipped[:3])
        render.warn(
            f"{len(skipped)} changed tensor(s) not in the adapter: {shown}"
            + (" …" if len(skipped) > 3 else "")
        )
    new = result.plan.only_in_finetuned
    if new:
        render.warn(f"{len(new)} tensor(s) only in the fine-tune, not carried: {', '.join(new[:3])}")
    if as_json:
        render.emit_json(report.to_dict())
        return
    rows = [(m.name, m.rank, m.energy_kept, m.relative_error) for m in result.modules]
    render.table(f"extracted → {report.output}", ["module", "rank", "energy kept", "relative error"], rows,
                 quiet=quiet)  # fmt: skip
    if not quiet:
        errors = [m.relative_error for m in result.modules]
        render.note(f"{len(rows)} modules, {result.adapter.num_parameters:,} parameters, energy kept "
                    f"{result.energy_kept:.4f}, mean relative error {sum(errors) / len(errors):.4g}")  # fmt: skip
