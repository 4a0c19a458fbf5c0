"""``loratools doctor ADAPTER [--base BASE] [--for RUNTIMES]``: will it load where I run it?"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from loratools.cli import render
from loratools.cli.options import reporting
from loratools.cli.render import escape

if TYPE_CHECKING:
    from loratools.ops.doctor.findings import DoctorReport, Finding

STYLE = {"loads": "green", "loads with changes": "yellow", "will not load": "bold red"}


@click.command()
@click.argument("adapter")
@click.option(
    "--base", default=None, help="The base model: check names, shapes and merge precision against it."
)
@click.option(
    "--for",
    "runtimes",
    default=None,
    metavar="RUNTIMES",
    help="Comma-separated: peft, vllm, llama.cpp, diffusers, comfyui, tgi, sglang [default: all].",
)
@click.option(
    "--no-precision",
    is_flag=True,
    help="With --base, skip the merge precision check (reads every base tensor).",
)
@reporting
def doctor(
    adapter: str, base: str | None, runtimes: str | None, no_precision: bool, as_json: bool, quiet: bool
) -> None:
    """Check ADAPTER against the runtimes you will load it in: per runtime, loads / loads with changes /
    will not load, each finding with its modules, its source and the loratools command that fixes it.
    Exit code 1 when a runtime asked for will not load it."""
    from loratools.commands.doctor import DoctorOptions
    from loratools.commands.doctor import doctor as run

    options = DoctorOptions(adapter, base, runtimes, precision=not no_precision)
    with render.progress(0, "merge precision", quiet=quiet or as_json) as advance:
        report = run(options, progress=advance)
    if as_json:
        render.emit_json(report.to_dict())
    elif not quiet:
        _show(report)
    sys.exit(report.exit_code)


def _show(report: DoctorReport) -> None:
    head = f"{report.adapter}: {report.label}" + (f", checked against {report.base}" if report.base else "")
    render.note(escape(head))
    if report.general:
        _findings("every runtime", report.general)
    rows = [
        (r.runtime, r.version, f"[{STYLE[r.verdict]}]{r.verdict}[/]", len(r.findings))
        for r in report.runtimes
    ]
    render.table("doctor", ["runtime", "rules from", "verdict", "findings"], rows)
    if report.not_checked:
        render.note(
            f"not checked (they run other kinds of models; name them with --for): {', '.join(report.not_checked)}"
        )
    for verdict in report.runtimes:
        if verdict.findings:
            _findings(f"{verdict.runtime} ({verdict.version})", verdict.findings)


def _findings(title: str, findings: tuple[Finding, ...]) -> None:
    from loratools.ops.doctor.findings import VERDICTS

    render.note(f"[bold]{escape(title)}[/]")
    for f in findings:
        style = STYLE[VERDICTS[f.severity]]
        render.note(f"  [{style}]{f.severity}[/] {escape(f.rule)}: {escape(f.effect)} — {escape(f.message)}")
        for label, text in (("", f.modules_text()), ("source: ", f.source), ("fix: ", f.fix or "")):
            if text:
                render.note(f"      {label}{escape(text)}")
