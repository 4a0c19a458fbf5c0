"""Benchmark: an adapter's spectrum in factored form vs forming B·A and running a dense SVD.

Same adapter, same run: 32 modules of d = k = 4096 (eight Llama-7B-sized layers × q, k, v, o),
at r = 16 and r = 64. Each contender runs in its own process (wall time, peak RSS):

- factored: ``loratools.ops.spectrum.adapter_spectrum`` — QR(B), QR(Aᵀ), SVD of the r×r core,
  O((d + k)·r²) per module;
- dense: ``torch.linalg.svdvals(s·B @ A)`` — the d×k product and a LAPACK SVD, O(d·k·min(d, k));
- read: loading the adapter file alone (the floor for any tool);
- CLI: ``loratools spectrum ADAPTER --json`` end to end (imports, read, compute, JSON).

A dense SVD of 4096² takes ~14 s on an idle 2-core machine (minutes when it is shared), so the
dense side may be measured on the first ``--dense-modules`` modules only; the report says so and
gives per-module times (all modules have the same shape). Agreement: the max relative difference
|σ_factored − σ_dense| / σ_dense over every singular value of the modules both computed.

    .venv/bin/python benchmarks/bench_spectrum.py [--ranks 16 64] [--modules 32] [--dense-modules 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_note, markdown_table, run_measured
from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import load_adapter, save_adapter

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapter(folder: Path, rank: int, modules: int, dim: int) -> Path:
    """A deterministic float32 PEFT adapter: ``modules`` modules of (dim × dim), Gaussian B and A."""
    if (folder / "adapter_config.json").is_file():
        return folder
    gen = torch.Generator().manual_seed(rank)
    weights = {}
    for index in range(modules):
        name = f"model.layers.{index // len(KINDS)}.self_attn.{KINDS[index % len(KINDS)]}"
        a = torch.randn(rank, dim, generator=gen) / dim**0.5  # (r, k)
        b = torch.randn(dim, rank, generator=gen) * torch.linspace(1.0, 0.1, rank) / rank**0.5  # (d, r)
        weights[name] = LoraWeight(a, b, alpha=2.0 * rank)
    save_adapter(Adapter(weights, base_model="bench/llama-like"), folder)
    return folder


# -- workers (each runs in its own measured process) ------------------------------------------
def worker(kind: str, adapter_path: str, out: str, limit: int) -> None:
    start = time.perf_counter()
    adapter = load_adapter(adapter_path)  # reads every byte into fresh tensors (readinto, no mmap)
    read_s = time.perf_counter() - start
    values: dict[str, list[float]] = {}
    warm = torch.randn(64, 8)
    torch.linalg.svdvals(warm @ warm.T), torch.linalg.qr(warm)  # load LAPACK before the clock starts
    start = time.perf_counter()
    if kind == "factored":
        from loratools.ops.spectrum import adapter_spectrum

        values = {m.name: m.singular_values.tolist() for m in adapter_spectrum(adapter).modules}
    elif kind == "dense":
        for name in list(adapter.weights)[:limit]:
            weight = adapter.weights[name]
            delta = weight.delta()  # (d, k) float32: the matrix the factored form never builds
            values[name] = torch.linalg.svdvals(delta)[: weight.rank].double().tolist()
    compute_s = time.perf_counter() - start
    doc = {"read_s": read_s, "compute_s": compute_s, "modules": len(values), "values": values}
    Path(out).write_text(json.dumps(doc))


# -- driver -------------------------------------------------------------------------------------
def measure(kind: str, adapter: Path, root: Path, limit: int) -> dict:
    out = root / f"{adapter.name}-{kind}.json"
    cmd = [sys.executable, __file__, "--worker", kind, str(adapter), str(out), "--dense-modules", str(limit)]
    load = os.getloadavg()[0]  # a shared machine: say how busy it was when this ran
    m = run_measured(cmd).check()
    return {**json.loads(out.read_text()), "wall_s": m.wall_s, "rss_mb": m.peak_rss_mb, "load": load}


def agreement(factored: dict[str, list[float]], dense: dict[str, list[float]]) -> float:
    """max |σ_f − σ_d| / σ_d over every singular value of the modules both computed."""
    worst = 0.0
    for name, d in dense.items():
        f = torch.tensor(factored[name], dtype=torch.float64)
        d_t = torch.tensor(d, dtype=torch.float64)
        worst = max(worst, float(((f - d_t).abs() / d_t).max()))
    return worst


def run(args: argparse.Namespace) -> str:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows, cli_rows = [], []
    for rank in args.ranks:
        adapter = make_adapter(root / f"r{rank}", rank, args.modules, args.dim)
        read = measure("read", adapter, root, 0)
        fact = measure("factored", adapter, root, 0)
        dense = measure("dense", adapter, root, args.dense_modules)
        cli = run_measured(
            [str(Path(sys.executable).parent / "loratools"), "spectrum", str(adapter), "--json", "-q"]
        )
        cli.check()
        per_fact = fact["compute_s"] / fact["modules"]
        per_dense = dense["compute_s"] / dense["modules"]
        rows.append([rank, fact["modules"], fact["compute_s"], per_fact * 1e3, dense["modules"], per_dense,
                     per_dense / per_fact, per_dense * fact["modules"], agreement(fact["values"], dense["values"]),
                     f"{fact['load']:.1f} / {dense['load']:.1f}"])  # fmt: skip
        cli_rows.append([rank, read["read_s"], fact["read_s"] + fact["compute_s"], cli.wall_s,
                         read["rss_mb"], fact["rss_mb"], dense["rss_mb"], cli.peak_rss_mb])  # fmt: skip
        print(f"r={rank}: factored {fact['compute_s']:.4f}s, dense {per_dense:.1f}s/module", flush=True)
    table = markdown_table(
        ["r", "modules", "factored total (s)", "factored / module (ms)", "dense modules timed",
         "dense / module (s)", "speed-up / module", "dense for all modules (s, per-module × n)",
         "max rel. diff of σ", "load avg factored / dense"],
        rows,
    )  # fmt: skip
    io_table = markdown_table(
        ["r", "read adapter (s)", "read + factored spectrum (s)", "`loratools spectrum --json` wall (s)",
         "RSS read (MB)", "RSS factored (MB)", "RSS dense (MB)", "RSS CLI (MB)"],
        cli_rows,
    )  # fmt: skip
    return f"{table}\n\n{io_table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--modules", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dense-modules", type=int, default=32, help="modules the dense SVD is timed on")
    parser.add_argument("--root", default="/tmp/loratools-bench-spectrum")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2], args.dense_modules)
        return
    command = " ".join(["python benchmarks/bench_spectrum.py", *sys.argv[1:]])
    body = run(args)
    print(body)
    print(f"command: {command}\nmachine: {machine_note()}")


if __name__ == "__main__":
    main()
