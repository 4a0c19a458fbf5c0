"""``loratools spectrum ADAPTER`` / ``loratools spectrum BASE FINETUNED``: is the update low-rank?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from loratools.cli import render
from loratools.cli.options import device_option, reporting
from loratools.errors import InvalidOptions

if TYPE_CHECKING:
    from loratools.commands.spectrum import SpectrumReport
    from loratools.ops.spectrum import ModuleSpectrum
    from loratools.ops.spectrum import SpectrumReport as MeasureReport

SPARK_VALUES = 24  # singular values drawn in each module's sparkline


def _default(field: str) -> Any:
    """The options dataclass's default for ``field``, read when the command runs: importing the
    command module loads torch, which ``--help`` must not wait for. The help text shows the value
    given beside it (``HELP_DEFAULTS``); a test checks the two agree."""

    def read() -> Any:
        from loratools.commands.spectrum import SpectrumOptions

        return getattr(SpectrumOptions, field)

    return read


HELP_DEFAULTS = {"top": "64", "intruder_k": "10", "intruder_epsilon": "0.5"}


@click.command()
@click.argument("paths", nargs=-1, metavar="ADAPTER | BASE FINETUNED")
@click.option(
    "--base", "base_path", metavar="BASE", help="ADAPTER's base model: adds ‖Δ‖_F / ‖UᵀW0V‖_F (§7.3)."
)
@click.option(
    "--top",
    type=int,
    default=_default("top"),
    show_default=HELP_DEFAULTS["top"],
    help="Singular values per ΔW (BASE FINETUNED; randomized).",
)
@click.option("--exact", is_flag=True, help="Full SVD of each ΔW: complete spectra, slow for large tensors.")
@click.option("--include", metavar="REGEX", help="BASE FINETUNED: only tensors whose name matches REGEX.")
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the spectra to FILE.png."
)
@click.option("--force", is_flag=True, help="Replace the --plot FILE if it exists.")
@click.option(
    "--geometry", is_flag=True, help="Add magnitude/direction change (DoRA) and top-k rotation per module."
)
@click.option(
    "--intruders", is_flag=True, help="Add intruder dimensions (a full SVD of each base matrix: slow)."
)
@click.option(
    "--intruder-k",
    type=int,
    default=_default("intruder_k"),
    show_default=HELP_DEFAULTS["intruder_k"],
    help="Top singular directions examined.",
)
@click.option(
    "--intruder-epsilon",
    type=float,
    default=_default("intruder_epsilon"),
    show_default=HELP_DEFAULTS["intruder_epsilon"],
    help="Intruder below this similarity.",
)
@click.option(
    "--geometry-plot",
    "geometry_plot_path",
    type=click.Path(dir_okay=False),
    help="Draw intruders, ΔD vs ΔM and alignment to FILE.png.",
)
@device_option
@reporting
def spectrum(
    paths: tuple[str, ...],
    base_path: str | None,
    top: int,
    exact: bool,
    include: str | None,
    plot_path: str | None,
    force: bool,
    geometry: bool,
    intruders: bool,
    intruder_k: int,
    intruder_epsilon: float,
    geometry_plot_path: str | None,
    device: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Singular values of each module's update, and the rank that keeps 90% / 99% of its energy.

    With one argument, ADAPTER's Δ = s·B·A (exact, factored: never the d×k product). With two,
    the full ΔW = W_ft − W_base of a fine-tune (top-k by randomized SVD, exact ‖ΔW‖_F).
    """
    from loratools.commands.spectrum import SpectrumOptions, open_spectrum

    options = SpectrumOptions(
        paths, base=base_path, top=top, exact=exact, include=include, geometry=geometry, intruders=intruders,
        intruder_k=intruder_k, intruder_epsilon=intruder_epsilon, device=device,
    )  # fmt: skip
    if geometry_plot_path and not options.measure.geometry.enabled:
        raise InvalidOptions("--geometry-plot draws what --geometry or --intruders measure: add one of them")
    plot_path = check_plot_output(plot_path, force, [*paths, base_path])
    geometry_plot_path = check_plot_output(geometry_plot_path, force, [*paths, base_path])
    opened = open_spectrum(options)
    label = "spectrum" if len(paths) == 1 else "spectrum of ΔW"
    with render.progress(opened.total, label, quiet=quiet) as advance:
        report = opened.run(advance)
    if plot_path:
        _write_plot(report, plot_path, force, " vs ".join(paths))
    if geometry_plot_path:
        _write_geometry_plot(report, geometry_plot_path, force, " vs ".join(paths))
    if as_json:
        render.emit_json(report.to_dict())
    elif not quiet:
        _show(report)


def check_plot_output(plot_path: str | None, force: bool, inputs: list[str | None]) -> str | None:
    """Refuse a bad --plot before the work, not after it; returns the file to write.

    A name without a suffix gets ``.png`` (plots are PNG images); another suffix is refused
    rather than filled with PNG bytes.
    """
    if not plot_path:
        return None
    from loratools.errors import LoratoolsError, OutputExists
    from loratools.io.writer import check_not_an_input
    from loratools.plot import require_matplotlib

    suffix = Path(plot_path).suffix
    if not suffix:
        render.note(f"--plot {plot_path}: plots are PNG images, writing {plot_path}.png")
        plot_path += ".png"
    elif suffix.lower() != ".png":
        raise LoratoolsError(f"--plot {plot_path}: plots are PNG images; name the file with .png")
    require_matplotlib()
    check_not_an_input(Path(plot_path), [Path(p) for p in inputs if p and Path(p).exists()])
    if Path(plot_path).exists() and not force:
        raise OutputExists(f"{plot_path} already exists; pass --force to replace it")
    return plot_path


def _write_plot(report: SpectrumReport, plot_path: str, force: bool, label: str) -> None:
    from loratools.io.writer import atomic_output
    from loratools.plot import plot_spectrum

    result = report.result
    what = "Δ = s·B·A of adapter" if result.source == "adapter" else "ΔW = W_ft − W_base of"
    settings = result.settings
    how = (
        f" (top {settings['top']} by randomized SVD; energies exact)"
        if settings["method"] == "randomized"
        else ""
    )
    # the figure reads the --json shape, which is also what `plot` is tested against
    png = plot_spectrum(report.to_dict(), f"Singular-value spectra of {what} {label}{how}")
    with atomic_output(plot_path, force=force) as temporary:
        temporary.write_bytes(png)


def _write_geometry_plot(report: SpectrumReport, plot_path: str, force: bool, label: str) -> None:
    from loratools.io.writer import atomic_output
    from loratools.plot_geometry import plot_geometry

    what = "W0 + s·B·A against W0" if report.result.source == "adapter" else "W_ft against W_base"
    png = plot_geometry(report.to_dict(), f"What fine-tuning did: {what}, {label}")
    with atomic_output(plot_path, force=force) as temporary:
        temporary.write_bytes(png)


# -- terminal ---------------------------------------------------------------------------------
def _rank(value: int | None, module: ModuleSpectrum) -> str:
    return f">{len(module.singular_values)}" if value is None else str(value)


def _energy(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def _show(report: SpectrumReport) -> None:
    result = report.result
    modules = result.modules
    longest = max((len(m.singular_values) for m in modules), default=1)
    ranks = [r for r in ("1", "4", "16", "64") if int(r) <= longest][:3]
    labels = row_labels([m.name for m in modules])
    rows = []
    for m in modules:
        s = m.singular_values.tolist()
        spark = render.sparkline([v / s[0] for v in s[:SPARK_VALUES]]) if s and s[0] > 0 else ""
        energies = [_energy(_energy_at(m, int(r))) for r in ranks]
        shape = "×".join(map(str, m.shape))
        rows.append((labels[m.name], shape, f"{s[0]:.3g}" if s else "0", m.stable_rank,
                     _rank(m.effective_rank(0.9), m), _rank(m.effective_rank(0.99), m), *energies, spark))  # fmt: skip
    title = "Δ = s·B·A" if result.source == "adapter" else "ΔW = W_ft − W_base"
    for path, kind in zip(report.inputs, report.kinds, strict=False):
        render.note(f"{path}: {kind}")
    columns = ["module", "shape", "σ₁", "stable rank", "r@90%", "r@99%"]
    columns += [f"e({r})" for r in ranks] + ["σᵢ/σ₁"]
    render.table(f"Spectrum of {title}: {' vs '.join(report.inputs)}", columns, rows)
    _show_amplification(modules, labels)
    _show_geometry(result, labels)
    _show_noise_floor(modules, labels)
    summary = result.summary()  # pooled per group by ops.spectrum.summarize
    for key, label in (("by_type", "module type"), ("by_layer", "layer")):
        _show_groups(summary[key], label, ranks)
    _show_model(result, summary["model"])


def row_labels(names: list[str]) -> dict[str, str]:
    """Short row labels: ``layer.type`` (``3.q_proj``) when those are unique, else the full names."""
    from loratools.ops.spectrum import layer_of, module_type

    short = {n: f"{layer_of(n)}.{module_type(n)}" if layer_of(n) != "-" else n for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


def _energy_at(module: ModuleSpectrum, rank: int) -> float | None:
    """e(rank) where the computed spectrum reaches it; past its end, 1.0 when it is complete."""
    if rank <= len(module.singular_values):
        return module.energy_at(rank)
    return 1.0 if module.complete else None


def _show_amplification(modules: list[ModuleSpectrum], labels: dict[str, str]) -> None:
    amps = [(labels[m.name], m.amplification) for m in modules if m.amplification is not None]
    if not amps:
        return
    rows = [(name, a.rank, a.delta_norm, a.projection, a.factor, a.random_factor) for name, a in amps]
    columns = [
        "module",
        "r",
        "‖Δ‖_F",
        "‖UᵀW0V‖_F",
        "amplification",
        "random dirs",
    ]
    render.table("Amplification ‖Δ‖_F / ‖UᵀW0V‖_F (paper §7.3; U, V: top-r of Δ)", columns, rows)


def _show_groups(groups: dict[str, Any], label: str, ranks: list[str]) -> None:
    rows = []
    for name, g in groups.items():
        energies = [_energy(g["energy_at"].get(r, 1.0)) for r in ranks]
        uniform = [str(g["uniform_rank"][f]) if g["uniform_rank"][f] else "?" for f in ("0.9", "0.99")]
        rows.append((name, g["modules"], g["stable_rank_mean"], *uniform, *energies))
    columns = [
        label,
        "modules",
        "mean stable rank",
        "rank for 90%",
        "rank for 99%",
        *(f"e({r})" for r in ranks),
    ]
    render.table(f"By {label} (energy pooled over modules)", columns, rows)


def _show_model(result: MeasureReport, model: dict[str, Any]) -> None:
    if not model.get("modules"):
        render.note("no module changed")
        return
    parts = []
    for f in ("0.9", "0.99"):
        uniform, total = model["uniform_rank"][f], model["total_rank"][f]
        if uniform is None:
            parts.append(f"{float(f):.0%}: beyond the computed top (use --exact or a larger --top)")
        else:
            parts.append(f"{float(f):.0%}: rank {uniform} on every module (or {total} in total, budgeted)")
    render.note(f"whole model ({model['modules']} modules) — " + "; ".join(parts))
    if result.unchanged:
        render.note(f"{len(result.unchanged)} tensors unchanged (ΔW = 0), not listed")
    if result.skipped:
        render.warn(f"{len(result.skipped)} tensors are in only one checkpoint: {result.skipped[:4]}")


def _show_noise_floor(modules: list[ModuleSpectrum], labels: dict[str, str]) -> None:
    """A quantized base: how much of each ΔW stands above its rounding (ops/spectrum/noise.py)."""
    floors = [(m, m.noise_floor) for m in modules if m.noise_floor is not None]
    if not floors:
        return
    rows = [(labels[m.name], f.top, f.norm / f.delta_norm if f.delta_norm > 0 else None, f.above)
            for m, f in floors]  # fmt: skip
    columns = ["module", "σ₁ of Q(W_ft) − W_ft", "‖noise‖/‖ΔW‖", "σ of ΔW above it"]
    render.table("Rounding noise floor of the quantized base", columns, rows)
    render.note("directions of ΔW below the floor cannot be told from the base's quantization rounding")


def _show_geometry(result: MeasureReport, labels: dict[str, str]) -> None:
    """Per module: ΔM, ΔD, the top-k alignment and spectral shift, intruder count and similarities."""
    measured = [(m, m.geometry) for m in result.modules if m.geometry is not None]
    parts = ("magnitude_direction", "rotation", "intruders")
    measured = [(m, g) for m, g in measured if any(getattr(g, p) is not None for p in parts)]
    if not measured:
        return
    rows = []
    for m, g in measured:
        md, rot, intr = g.magnitude_direction, g.rotation, g.intruders
        rows.append((
            labels[m.name],
            md.delta_m if md else "",
            md.delta_d if md else "",
            min(rot.alignment) if rot else "",
            max(rot.sigma_change, key=abs) if rot else "",
            intr.count if intr else "",
            min(intr.similarities) if intr else "",
        ))  # fmt: skip
    columns = ["module", "ΔM", "ΔD", "min |⟨u′ᵢ,uᵢ⟩|", "largest Δσᵢ", "intruders", "lowest sⱼ"]
    render.table("What fine-tuning did (W′ against W0; top-k directions)", columns, rows)
    if any(g.magnitude_direction is not None for _, g in measured):  # the --json document's condition
        correlation = result.direction_magnitude_correlation()
        if correlation is not None:
            render.note(
                f"correlation of ΔD with ΔM across modules: {correlation:+.2f} "
                "(DoRA paper: negative for full fine-tuning, positive for LoRA)"
            )
