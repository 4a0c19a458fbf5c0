"""Merge benchmark: loratools merge vs PEFT's merge_and_unload vs the I/O floor, in one run.

    python benchmarks/bench_merge.py [--layers 12] [--rank 16] [--repeat 2] [--root /tmp/loratools-bench] [--dora]

On make_llama_pair's bf16 sharded base (12 layers ≈ 0.66 B parameters, 1.3 GB) with a rank-16
PEFT adapter on every attention and MLP linear, each measured in its own process:

- floor:      read every file of the base once and write the same bytes once (Python, 64 MB chunks);
- floor+torch: the same after ``import torch`` (what any torch-based tool pays before working);
- loratools:  ``loratools merge BASE ADAPTER -o OUT --quiet``;
- peft:       transformers from_pretrained (bf16) → PeftModel.from_pretrained → merge_and_unload →
              save_pretrained.

With ``--dora`` the adapter is DoRA (PEFT ``use_dora``: a magnitude per output row, within ±5% of
‖W0 + s·B·A‖_row) and both tools merge it exactly (loratools also writes its norms record).

Page cache is warm for all runs (the base is read once first). Prints a markdown table; the
numbers in benchmarks/results/merge.md were copied from its output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import LINEARS, ROOT, machine_note, make_llama_pair, markdown_table, run_measured
from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import save_adapter
from loratools.io.checkpoint import open_checkpoint

FLOOR = """
import sys
from pathlib import Path
{imports}
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
buf = bytearray(64 << 20)
view = memoryview(buf)
for item in sorted(src.iterdir()):
    with open(item, "rb") as fin, open(dst / item.name, "wb") as fout:
        while n := fin.readinto(buf):
            fout.write(view[:n])
"""

# run_measured's wait4 rusage counts the benchmark process's own RSS high-water mark (Linux carries
# it across fork/vfork + exec), so each command runs under this small shim, which reports its
# child's peak RSS and wall time on the last stderr line.
SHIM = """
import os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
print(f"@@shim {os.waitstatus_to_exitcode(status)} {wall} {usage.ru_maxrss / 1024}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""

PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def make_adapter(base: Path, out: Path, rank: int, dora: bool = False) -> Path:
    """A rank-``rank`` float32 PEFT adapter on every block linear: A ~ N(0, 1/in), B ~ N(0, 0.02²);
    with ``dora``, magnitudes m = ‖W0 + s·B·A‖_row · (1 + 0.05·N(0, 1)) (PEFT's use_dora)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    ckpt = open_checkpoint(base)
    gen = torch.Generator().manual_seed(16)
    weights = {}
    for name in ckpt.names():
        if any(f".{linear}." in name for linear in LINEARS):
            d, k = ckpt.info(name).shape
            a = torch.randn(rank, k, generator=gen) * k**-0.5  # (r, in)
            b = torch.randn(d, rank, generator=gen) * 0.02  # (out, r)
            weights[name.removesuffix(".weight")] = LoraWeight(a, b, alpha=2.0 * rank)
            if dora:
                norms = (ckpt.get(name).float() + 2.0 * b @ a).norm(dim=1)  # s = alpha / r = 2
                m = norms * (1.0 + 0.05 * torch.randn(d, generator=gen))
                weights[name.removesuffix(".weight")] = LoraWeight(a, b, alpha=2.0 * rank, magnitude=m)
    save_adapter(Adapter(weights, base_model=str(base), task_type="CAUSAL_LM"), out, force=True)
    return out


def commands(base: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "floor": [py, "-c", FLOOR.format(imports=""), str(base), str(out / "floor")],
        "floor+torch": [py, "-c", FLOOR.format(imports="import torch"), str(base), str(out / "floor+torch")],
        "loratools": [
            py,
            "-m",
            "loratools.cli.main",
            "merge",
            str(base),
            str(adapter),
            "-o",
            str(out / "lt"),
            "-q",
        ],
        "peft": [py, "-c", PEFT, str(base), str(adapter), str(out / "peft")],
    }


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of ``cmd``, run under SHIM (see there)."""
    m = run_measured([sys.executable, "-c", SHIM, *cmd], cwd=ROOT).check()
    _, _, wall, peak = m.stderr.strip().splitlines()[-1].split()
    return float(wall), float(peak)


def max_difference(ours: Path, peft: Path) -> tuple[float, int]:
    """Largest |ours − peft| over all tensors, and how many tensors are not bit-identical."""
    a, b = open_checkpoint(ours), open_checkpoint(peft)
    worst, differ = 0.0, 0
    for name in a.names():
        x, y = a.get(name).float(), b.get(name).float()
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        worst, differ = max(worst, diff), differ + (diff > 0)
    return worst, differ


def run(args: argparse.Namespace) -> str:
    base, _ = make_llama_pair(args.root, layers=args.layers)
    kind = "dora" if args.dora else "lora"
    adapter = make_adapter(
        base,
        args.root / f"adapter-r{args.rank}-l{args.layers}{'-dora' if args.dora else ''}",
        args.rank,
        args.dora,
    )
    size_gb = sum(f.stat().st_size for f in base.iterdir()) / 1e9
    for item in base.iterdir():  # warm the page cache so every run sees the same state
        item.read_bytes()
    walls: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}
    for repeat in range(args.repeat):
        out = args.root / f"merge-out-{repeat}"
        _clean(out)
        out.mkdir()
        runs = list(commands(base, adapter, out).items())
        for label, cmd in runs[repeat % len(runs) :] + runs[: repeat % len(runs)]:  # rotate the order
            os.sync()  # start every run without the previous one's dirty pages still being flushed
            wall, peak = measure(cmd)
            walls.setdefault(label, []).append(wall)
            rss.setdefault(label, []).append(peak)
            print(f"  {label:12s} {wall:7.2f} s {peak:8.0f} MB", file=sys.stderr)
        if repeat == 0:
            worst, differ = max_difference(out / "lt", out / "peft")
        _clean(out)
    # the machine is shared: the fastest of the repeats is the least disturbed estimate of each
    # run's own cost; the median is shown too
    rows = []
    best = {label: min(times) for label, times in walls.items()}
    for label in walls:
        ratio = best["loratools"] / best[label]
        rows.append([label, best[label], statistics.median(walls[label]), ratio, max(rss[label])])
    columns = ["run", "wall s (best)", "wall s (median)", "loratools ÷ run (best)", "peak RSS MB (max)"]
    table = markdown_table(columns, rows)
    note = (
        f"base: make_llama_pair(layers={args.layers}) bf16, {size_gb:.2f} GB; {kind} adapter r={args.rank} on all "
        f"{len(LINEARS)} block linears; {args.repeat} repeat(s), warm page cache; "
        f"loratools vs PEFT max |Δ| = {worst:.3g} ({differ} tensors not bit-identical)"
    )
    return f"{note}\n\n{table}\n"


def _clean(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/loratools-bench"))
    parser.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora) instead of plain LoRA")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args)
    print(result)
    print(f"({machine_note()}; benchmark took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
