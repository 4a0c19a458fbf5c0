"""``loratools merge | unmerge | swap``: bake adapters into base weights, take them out, switch them.

loratools merge BASE ADAPTER... -o OUT [--weight W ...]       W = W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ
loratools unmerge MERGED ADAPTER... -o OUT [--weight W ...]   W = W0 − Σ wᵢ·sᵢ·Bᵢ·Aᵢ
loratools swap MERGED --remove ADAPTER --add ADAPTER -o OUT   both, in one pass
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting
from loratools.errors import InvalidOptions

if TYPE_CHECKING:
    from loratools.commands.merge import MergeReport

TABLE_ROWS = 24  # beyond this many modules the table shows the ones losing most to rounding


def _weights(adapters: Sequence[str], weights: Sequence[float], flag: str) -> list[tuple[str, float]]:
    if weights and len(weights) != len(adapters):  # a value error, not a flag click cannot parse: exit 1
        raise InvalidOptions(
            f"{len(weights)} {flag} value(s) for {len(adapters)} adapter(s); give one per adapter, or none"
        )
    return list(zip(adapters, weights or [1.0] * len(adapters), strict=True))


def _run(
    base: str,
    output: str,
    add: list[tuple[str, float]],
    remove: list[tuple[str, float]],
    settings: dict[str, Any],
) -> None:
    """Build the options, make the one library call, render the report."""
    from loratools.commands.merge import MergeOptions, open_merge

    quiet, as_json = settings.pop("quiet"), settings.pop("as_json")
    opened = open_merge(MergeOptions(base, output, tuple(add), tuple(remove), **settings))  # type: ignore[arg-type]
    label = "swapping" if add and remove else "merging" if add else "unmerging"
    with render.progress(opened.total, label, quiet=quiet) as advance:
        report = opened.run(advance)
    for warning in report.result.warnings:
        render.warn(warning)
    if as_json:
        render.emit_json(report.to_dict())
        return
    _summary(report, quiet)


def _summary(written: MergeReport, quiet: bool) -> None:
    report = written.result
    modules = sorted(
        report.modules, key=lambda m: -(m.lost_fraction if m.lost_fraction == m.lost_fraction else 0)
    )
    shown = modules[:TABLE_ROWS] if len(modules) > TABLE_ROWS else report.modules
    rows: list[tuple[Any, ...]] = [
        (
            m.name.removesuffix(".weight"),
            "×".join(map(str, m.shape)),
            m.dtype,
            m.relative_delta,
            m.lost_fraction,
        )
        for m in shown
    ]
    title = f"{report.operation}: {len(report.modules)} tensor(s) updated"
    if len(shown) < len(modules):
        title += f" (the {len(shown)} losing most to rounding; --json lists all)"
    columns = ["module", "shape", "dtype", "‖Δ‖/‖W0‖", "lost"]
    if any(m.survival is not None for m in shown):  # --keep-quantization: what survived, and its direction
        rows = [(*row, m.survival, m.direction) for row, m in zip(rows, shown, strict=True)]
        columns += ["kept ‖ΔQ‖/‖Δ‖", "cos(ΔQ, Δ)"]
    render.table(title, columns, rows, quiet=quiet)
    if not quiet:
        render.note(
            f"{report.operation}: {len(report.modules)} updated, {len(report.replaced)} replaced, "
            f"{report.copied} copied unchanged; ‖Δ‖/‖W0‖ = {report.relative_delta:.3g}, "
            f"lost to rounding {report.lost_fraction:.3g} → {written.output}"
        )
        if report.dora_record:
            render.note(f"DoRA norms record (keep it: unmerge/swap need it) → {report.dora_record}")


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    for decorate in (
        click.option("-o", "--output", required=True, help="Folder (or .safetensors file) to write."),
        dtype_option,
        device_option,
        force_flag,
        reporting,
        click.option(
            "--keep-quantization",
            is_flag=True,
            help="Write the quantized base's own types back (GGUF, bitsandbytes, FP8) and report how "
            "much of each update survives requantization.",
        ),
    ):
        command = decorate(command)
    return command


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight per adapter (default 1).")
@click.option("--tokenizer", help="Copy this folder's tokenizer files into the output (a grown vocabulary).")
@_common
def merge(
    base: str, adapters: tuple[str, ...], weights: tuple[float, ...], output: str, **settings: Any
) -> None:
    """Merge ADAPTERS into BASE: W = W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, in float32, one cast at the end.

    OUT keeps BASE's layout (file names, shards, index, metadata, dtypes) and config files.
    """
    _run(base, output, _weights(adapters, weights, "--weight"), [], settings)


@click.command()
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight each was merged with.")
@_common
def unmerge(
    merged: str, adapters: tuple[str, ...], weights: tuple[float, ...], output: str, **settings: Any
) -> None:
    """Subtract ADAPTERS from MERGED weights: W = W − Σ wᵢ·sᵢ·Bᵢ·Aᵢ."""
    _run(merged, output, [], _weights(adapters, weights, "--weight"), settings)


@click.command()
@click.argument("merged")
@click.option("--remove", "removed", multiple=True, required=True, help="Adapter merged in MERGED.")
@click.option("--add", "added", multiple=True, required=True, help="Adapter to merge instead.")
@click.option(
    "--remove-weight", type=float, multiple=True, help="Weight the removed adapter was merged with."
)
@click.option("--add-weight", type=float, multiple=True, help="Weight for the added adapter.")
@_common
def swap(
    merged: str,
    removed: tuple[str, ...],
    added: tuple[str, ...],
    remove_weight: tuple[float, ...],
    add_weight: tuple[float, ...],
    output: str,
    **settings: Any,
) -> None:
    """Replace one merged adapter by another in one streaming pass: W − s₁B₁A₁ + s₂B₂A₂."""
    add = _weights(added, add_weight, "--add-weight")
    _run(merged, output, add, _weights(removed, remove_weight, "--remove-weight"), settings)
