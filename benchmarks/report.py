"""Assemble docs/benchmarks.md from the latest results in benchmarks/results/*.md.

    python -m benchmarks.report

Each benchmark script writes its own results file (date, exact command, tables, machine); this
page puts a summary on top and the full results below, in a fixed order. Commands are shown
without the paths of the machine they ran on (:func:`portable`): the repository's files relative
to its root, executables by name, and scratch folders as BASE, FINETUNED, OUT and WORKDIR.
"""

from __future__ import annotations

import re

from benchmarks.common import ROOT

ORDER = [
    "extract",
    "merge",
    "io_profile",
    "near_floor",
    "idle_rerun",
    "extract_mergekit",
    "floor_wave3",
    "scale_7b_idle",
    "scale_7b",
    "scale_7b_peers",
    "quantized_merge",
    "spectrum",
    "combine",
    "lycoris",
    "train",
    "gpu",
]
HEADER = """# Benchmarks

**TL;DR** — each benchmark runs loratools and the tool a user would otherwise reach for *in the
same run*, each measured run in its own process (wall time and its own peak RSS), and reports
ratios: these 2-core machines are shared and noisy, so absolute seconds move by up to 2× between
runs while the ratios hold. Benchmarks are scripts in `benchmarks/`, never tests.

| operation | compared with | headline (same run) | details |
|---|---|---|---|
{rows}

Regenerate this page after re-running a benchmark: `python -m benchmarks.report`.

"""


# Scratch folders the benchmarks build their checkpoints in, e.g. /tmp/loratools-bench-extract/layers4/.
SCRATCH = r"/tmp/[\w.-]+(?:/layers\d+)?"
PLACEHOLDERS = [
    (re.compile(r"(?:/[\w.-]+)+/(?=benchmarks/[\w.-]+\.py)"), ""),  # a checkout's scripts: repo-relative
    (re.compile(r"(?:/[\w.-]+)+/\.venv/bin/"), ""),  # a project virtualenv's python: by name
    (re.compile(r"(?:/[\w.-]+)*/venvs/[\w.-]+/bin/"), ""),  # a tool in its own virtualenv: by name
    (re.compile(r"/tmp/[\w.-]*venv/bin/"), ""),  # a tool in its own virtualenv: by name
    (re.compile(r"/tmp/[\w.-]*venv\b"), "a separate virtualenv"),
    (re.compile(SCRATCH + r"/base\b"), "BASE"),
    (re.compile(SCRATCH + r"/finetuned\b"), "FINETUNED"),
    (re.compile(SCRATCH + r"/outputs\b"), "OUT"),
    (re.compile(r"/tmp/[\w.-]+"), "WORKDIR"),
]


def portable(text: str) -> str:
    """``text`` without this machine's paths: ``<repo>/.venv/bin/loratools`` → ``loratools``,
    ``<repo>/benchmarks/x.py`` → ``benchmarks/x.py``, ``/tmp/…/layers4/base`` → ``BASE``,
    ``…/outputs/r16`` → ``OUT/r16``, any other ``/tmp/name`` → ``WORKDIR``."""
    text = text.replace(f"{ROOT}/.venv/bin/", "").replace(f"{ROOT}/", "")
    for pattern, placeholder in PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    return text


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    summary = (results / "summary.md").read_text().strip() if (results / "summary.md").is_file() else ""
    sections = [results / f"{name}.md" for name in ORDER if (results / f"{name}.md").is_file()]
    body = "\n\n---\n\n".join(p.read_text().strip() for p in sections)
    page = portable(HEADER.format(rows=summary) + body) + "\n"
    (ROOT / "docs" / "benchmarks.md").write_text(page)
    print(f"wrote docs/benchmarks.md from {len(sections)} results files")


if __name__ == "__main__":
    main()
