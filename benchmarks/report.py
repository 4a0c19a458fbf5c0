"""Assemble docs/benchmarks.md from the latest results in benchmarks/results/*.md.

    python -m benchmarks.report

Each benchmark script writes its own results file (date, exact command, tables, machine); this
page puts a summary on top and the full results below, in a fixed order.
"""

from __future__ import annotations

from benchmarks.common import ROOT

ORDER = ["extract", "merge", "spectrum", "combine", "train", "gpu"]
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


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    summary = (results / "summary.md").read_text().strip() if (results / "summary.md").is_file() else ""
    sections = [results / f"{name}.md" for name in ORDER if (results / f"{name}.md").is_file()]
    body = "\n\n---\n\n".join(p.read_text().strip() for p in sections)
    page = HEADER.format(rows=summary) + body + "\n"
    (ROOT / "docs" / "benchmarks.md").write_text(page)
    print(f"wrote docs/benchmarks.md from {len(sections)} results files")


if __name__ == "__main__":
    main()
