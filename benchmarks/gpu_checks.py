"""GPU checks, run on a machine with CUDA: CUDA results equal CPU results, and how fast each is.

    PYTHONPATH=. python3 benchmarks/gpu_checks.py --out DIR [--layers 8] [--steps 30]

1. extract: the same Llama-shaped bf16 pair (make_llama_pair) on --device cpu and cuda, r = 16;
   per module ‖ΔBA_cuda − ΔBA_cpu‖_F / ‖ΔBA_cpu‖_F and the ratio of the reported relative errors.
2. merge: that adapter into the base on cpu and cuda; the fraction of bf16 outputs that differ and
   by how many units in the last place.
3. train: the fixture model in float32 for 10 steps on cpu and cuda (losses compared), then bf16
   tokens/s and model FLOPs utilisation on the make_llama_pair base (≈0.48 B parameters at 8 layers).

Everything goes through the CLI (``python -m loratools.cli.main … --json``), so the wall times
include start-up, as a user sees them. Results: DIR/gpu.json and DIR/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine_note, make_llama_pair, markdown_table
from loratools.io.adapter_dir import load_adapter
from loratools.io.checkpoint import open_checkpoint

H200_BF16_PEAK = 989.5e12  # dense bf16 tensor-core FLOP/s (H100/H200 SXM datasheet)
DEVICE = {"cpu": "cpu", "cuda": "cuda"}  # --dry-run maps "cuda" to the CPU to test this script


def cli(*args: object) -> tuple[dict, float]:
    """Run one loratools command with --json; its document and wall time."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "loratools.cli.main", *(str(a) for a in args), "--json", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), wall


def compare_adapters(reference: Path, other: Path) -> float:
    """Worst per-module relative Frobenius difference of the dense deltas."""
    a, b = load_adapter(reference), load_adapter(other)
    worst = 0.0
    for name, weight in a.weights.items():
        da, db = weight.delta(), b.weights[name].delta()
        worst = max(worst, float((da - db).norm() / da.norm()))
    return worst


def compare_checkpoints(reference: Path, other: Path) -> tuple[float, int]:
    """Fraction of elements that differ, and the largest difference in units of the last place."""
    a, b = open_checkpoint(reference), open_checkpoint(other)
    differing, total, worst_ulp = 0, 0, 0
    for name, ta in a.iter_tensors():
        tb = b.get(name)
        if not ta.is_floating_point():
            continue
        bits_a = ta.contiguous().view(torch.int16).int() if ta.dtype == torch.bfloat16 else None
        if bits_a is not None:
            diff = (bits_a - tb.contiguous().view(torch.int16).int()).abs()
            worst_ulp = max(worst_ulp, int(diff.max()))
            differing += int((diff != 0).sum())
        else:
            differing += int((ta != tb).sum())
        total += ta.numel()
    return differing / total, worst_ulp


def check_extract_and_merge(work: Path, layers: int, rows: list[list[object]], report: dict) -> Path:
    base, finetuned = make_llama_pair(work / "pair", layers=layers)
    runs = {}
    for device in ("cpu", "cuda"):
        doc, wall = cli(
            "extract", base, finetuned, "-r", 16, "-o", work / f"adapter-{device}", "--device", DEVICE[device]
        )
        runs[device] = (doc, wall)
        rows.append([f"extract r=16 ({layers} layers)", device, wall])
    errors = {device: [m["relative_error"] for m in doc["modules"]] for device, (doc, _) in runs.items()}
    ratio = max(g / c for g, c in zip(errors["cuda"], errors["cpu"], strict=True))
    report["extract"] = {
        "modules": len(errors["cpu"]),
        "worst_relative_delta_difference": compare_adapters(work / "adapter-cpu", work / "adapter-cuda"),
        "worst_error_ratio_cuda_over_cpu": ratio,
        "wall_s": {device: wall for device, (_, wall) in runs.items()},
    }
    for device in ("cpu", "cuda"):
        _, wall = cli(
            "merge", base, work / "adapter-cpu", "-o", work / f"merged-{device}", "--device", DEVICE[device]
        )
        rows.append([f"merge ({layers} layers, bf16)", device, wall])
        report.setdefault("merge", {}).setdefault("wall_s", {})[device] = wall
    fraction, ulp = compare_checkpoints(work / "merged-cpu", work / "merged-cuda")
    report["merge"].update({"fraction_differing": fraction, "max_ulp": ulp})
    return base


def check_training(
    work: Path, base: Path, steps: int, seq_len: int, rows: list[list[object]], report: dict
) -> None:
    fixtures = ROOT / "fixtures"
    losses = {}
    for device in ("cpu", "cuda"):
        doc, wall = cli(
            "train", fixtures / "base", "--data", fixtures / "train" / "count.txt", "--tokenizer",
            fixtures / "train" / "tokenizer.json", "-o", work / f"fixture-train-{device}", "--steps", 10,
            "--seq-len", 32, "--device", DEVICE[device], "--eval-fraction", 0,
        )  # fmt: skip
        losses[device] = doc["losses"]
        rows.append(["train fixture 10 steps fp32", device, wall])
    report["train_equivalence"] = {
        "losses": losses,
        "max_relative_difference": max(
            abs(g - c) / abs(c) for g, c in zip(losses["cuda"], losses["cpu"], strict=True)
        ),
    }
    ids = work / "ids.jsonl"
    gen = torch.Generator().manual_seed(0)
    with ids.open("w") as f:
        for _ in range(512):
            f.write(
                json.dumps({"input_ids": torch.randint(0, 32000, (seq_len,), generator=gen).tolist()}) + "\n"
            )
    params = open_checkpoint(base).num_parameters
    for label, targets in (
        ("q,v", "q_proj,v_proj"),
        ("all linears", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    ):
        doc, wall = cli(
            "train", base, "--data", ids, "-o", work / f"train-{label.replace(',', '').replace(' ', '')}",
            "--targets", targets, "-r", 16, "--alpha", 32, "--steps", steps, "--batch-size", 8,
            "--seq-len", seq_len, "--dtype", "bfloat16", "--device", DEVICE["cuda"], "--eval-fraction", 0,
        )  # fmt: skip
        tps = doc["tokens_per_s"]
        entry = {
            "tokens_per_s": tps,
            "parameters": params,
            "mfu_6N": tps * 6 * params / H200_BF16_PEAK,  # the usual convention (weight grads included)
            "mfu_4N": tps * 4 * params / H200_BF16_PEAK,  # LoRA: frozen weights get no weight gradients
            "wall_s": wall,
            "final_loss": doc["losses"][-1],
        }
        report.setdefault("train_bf16", {})[label] = entry
        rows.append([f"train bf16 {params / 1e9:.2f}B r=16 {label}, batch 8×{seq_len}", "cuda", wall])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loratools-gpu"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: run the 'cuda' side on the CPU")
    args = parser.parse_args()
    if args.dry_run:
        DEVICE["cuda"] = "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
    report: dict = {"machine": f"{gpu}; {machine_note()}"}
    rows: list[list[object]] = []
    try:
        base = check_extract_and_merge(args.work, args.layers, rows, report)
        check_training(args.work, base, args.steps, args.seq_len, rows, report)
    finally:
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown_table(["run", "device", "wall s"], rows)
        (args.out / "gpu.md").write_text(f"{report['machine']}\n\n{table}\n")
        print(table)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
