"""``loratools combine ADAPTER... -o OUT``: weighted sums of adapters (exact, svd, ties, dare)."""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting, split_option


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
    type=click.Choice(["exact", "svd", "ties", "dare"]),
    help="exact (concatenate; default), svd (default with -r/--energy), ties or dare.",
)
@click.option("--density", type=float, help="ties: fraction of entries kept; dare: keep probability.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of DARE's masks and the randomized SVD."
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
    default="auto",
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
    import torch

    from loratools.device import resolve_device
    from loratools.io.adapter_dir import (
        check_output_form,
        describe_adapter,
        load_adapter,
        save_adapter_as,
    )
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.io.writer import check_not_an_input
    from loratools.ops.combine import CombineOptions, combine_adapters

    if weights and len(weights) != len(adapters):
        raise click.UsageError(
            f"got {len(weights)} --weight values for {len(adapters)} adapters; give one per adapter"
        )
    try:
        options = CombineOptions(
            weights=weights or None, method=method, rank=rank, energy=energy, density=density, seed=seed,  # type: ignore[arg-type]
            split=split, saved_modules=saved_modules, dtype=getattr(torch, dtype) if dtype else None,  # type: ignore[arg-type]
            device=resolve_device(device),
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    paths = [resolve_path(a, what="adapter") for a in adapters]
    check_not_an_input(output, paths)
    base_names = open_checkpoint(resolve_path(base)).names() if base else None
    loaded = [load_adapter(p, base_names=base_names) for p in paths]
    for adapter in loaded:
        check_output_form(adapter, output)
    _check_same_naming(adapters, loaded)
    modules = {name for adapter in loaded for name in adapter.weights}
    with render.progress(len(modules), "combine", quiet=quiet or as_json) as advance:
        result = combine_adapters(loaded, options, sources=list(adapters), progress=advance)
    save_adapter_as(result.adapter, output, force=force)
    if not (quiet or as_json):  # after the work: a refusal stays the only line on stderr
        for source, adapter in zip(adapters, loaded, strict=True):
            render.note(describe_adapter(source, adapter))
    _report(result.summary(), output, as_json, quiet)


def _check_same_naming(paths: tuple[str, ...], loaded: list) -> None:
    """Kohya names (a kohya file read without --base) and module paths never match: adding such
    adapters would silently give their union instead of their sum."""
    from loratools.errors import LoratoolsError
    from loratools.formats.detect import is_kohya_stem

    kohya = [
        p for p, a in zip(paths, loaded, strict=True) if a.weights and all(map(is_kohya_stem, a.weights))
    ]
    if kohya and len(kohya) < len(paths):
        raise LoratoolsError(
            f"{kohya[0]} has kohya names and other adapters have module paths, so no module would "
            "match; pass --base BASE to resolve the kohya names"
        )


def _report(summary: dict, output: Path, as_json: bool, quiet: bool) -> None:
    if as_json:
        render.emit_json({"output": str(output), **summary})
        return
    rows = [(m["name"], m["rank"], m["energy_kept"], len(m["sources"])) for m in summary["modules"]]
    render.table(
        f"combine ({summary['method']})", ["module", "rank", "energy kept", "inputs"], rows, quiet=quiet
    )
    if summary["saved_modules"]["dropped"]:
        render.warn(f"dropped modules_to_save: {', '.join(summary['saved_modules']['dropped'])}")
    if not quiet:
        render.note(f"wrote {output} ({len(rows)} modules, total rank {summary['rank_total']})")
