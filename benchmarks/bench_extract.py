"""Benchmark ``loratools extract`` against mergekit, a kohya-style dense SVD, and the I/O floor.

    .venv/bin/python benchmarks/bench_extract.py [--layers 4] [--rank 16] [--extra-rank 32]
        [--mergekit /tmp/mergekit-venv/bin/mergekit-extract-lora] [--out benchmarks/results/extract.md]

One run, side by side, on a deterministic Llama-shaped bf16 sharded pair (benchmarks.common:
ΔW = rank-16 signal + a decaying noise spectrum + bf16 rounding). Every tool runs in its own
subprocess; we report wall time, its ratio to the floor, and the peak RSS of that process.

- floor: start Python + torch + safetensors, read both checkpoints once, write an adapter-sized file.
- loratools: ``loratools extract BASE FT -r R -o OUT`` (randomized SVD, streaming).
- kohya-style: kohya's recipe (whole models in memory, diff in float32, full ``torch.linalg.svd``,
  keep r, clamp U·S and Vᵀ at their 0.99 quantile); ``full_matrices=False`` to be generous.
  It also records every module's full spectrum: the reference for the optimal error.
- mergekit: ``mergekit-extract-lora`` from its own venv (a dense full SVD per module).

Afterwards (not timed) each adapter's per-module ``‖ΔW − s·B·A‖_F / ‖ΔW‖_F`` is divided by the
optimal rank-r error ``sqrt(Σ_{i>r} σᵢ² / Σ σᵢ²)``; we report the mean and the worst ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LINEAR_SUFFIX = "_proj.weight"


# -- the measured peers (run as subprocesses of this same file) ----------------------------------------
def floor(base: str, finetuned: str, out: str, rank: int) -> None:
    """Read every byte of both checkpoints, then write an adapter of the same size (bf16 zeros)."""
    import torch
    from safetensors import safe_open  # noqa: F401  (start-up cost a real tool pays)
    from safetensors.torch import save_file

    from loratools.io.checkpoint import open_checkpoint

    shapes = {}
    for path in (base, finetuned):
        ckpt = open_checkpoint(path)
        for name, tensor in ckpt.iter_tensors():  # readinto: the bytes really are read
            shapes[name] = tuple(tensor.shape)
    tensors = {}
    for name, (d, k) in ((n, s) for n, s in shapes.items() if n.endswith(LINEAR_SUFFIX)):
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(rank, k, dtype=torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(d, rank, dtype=torch.bfloat16)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{out}/adapter_model.safetensors")


def kohya(base: str, finetuned: str, out: str, rank: int) -> None:
    """kohya-ss ``extract_lora_from_models.py``'s recipe, written out; also saves the full spectra."""
    import torch
    from safetensors.torch import load_file, save_file

    def load(folder: str) -> dict[str, torch.Tensor]:  # kohya holds both whole models in memory
        index = Path(folder) / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "model.safetensors"]  # fmt: skip
        return {k: v for f in files for k, v in load_file(f"{folder}/{f}").items()}

    w_base, w_ft = load(base), load(finetuned)
    tensors, spectra = {}, {}
    for name in (n for n in w_ft if n.endswith(LINEAR_SUFFIX)):
        mat = w_ft[name].float() - w_base[name].float()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        spectra[name.removesuffix(".weight")] = s.tolist()
        u = u[:, :rank] @ torch.diag(s[:rank])  # (out, r)
        vh = vh[:rank]  # (r, in)
        dist = torch.cat([u.flatten(), vh.flatten()])
        hi = torch.quantile(dist, 0.99)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        module = name.removesuffix(".weight")
        tensors[f"{module}.lora_up.weight"] = u.bfloat16().contiguous()
        tensors[f"{module}.lora_down.weight"] = vh.bfloat16().contiguous()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{out}/kohya.safetensors")
    (Path(out) / "spectra.json").write_text(json.dumps(spectra))


# -- evaluation (not timed) ------------------------------------------------------------------------------
def factors_of(path: Path) -> dict[str, tuple]:
    """module → (scale·B (out, r), A (r, in)) float32, from a PEFT folder or our kohya-style file."""
    from safetensors.torch import load_file

    from loratools.io.adapter_dir import load_adapter

    if (path / "kohya.safetensors").exists():
        t = load_file(path / "kohya.safetensors")
        modules = {k.removesuffix(".lora_up.weight") for k in t if k.endswith(".lora_up.weight")}
        return {m: (t[f"{m}.lora_up.weight"].float(), t[f"{m}.lora_down.weight"].float()) for m in modules}
    adapter = load_adapter(path)
    return {m: w.scaled_factors() for m, w in adapter.weights.items()}


def error_ratios(base: Path, finetuned: Path, adapter: Path, spectra: dict, rank: int) -> list[float]:
    """Per module ``(‖ΔW − s·B·A‖_F / ‖ΔW‖_F) / optimal``, with the optimum from the full spectrum."""
    import torch

    from loratools.io.checkpoint import open_checkpoint

    factors = {
        m.removeprefix("model."): f for m, f in factors_of(adapter).items()
    }  # mergekit may drop "model."
    b_ckpt, f_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    ratios = []
    for module, s in spectra.items():
        pair = factors.get(module) or factors.get(module.removeprefix("model."))
        if pair is None:
            raise SystemExit(f"{adapter}: no factors for {module}")
        delta = f_ckpt.get(module + ".weight").float() - b_ckpt.get(module + ".weight").float()
        b, a = pair
        error = float(torch.linalg.vector_norm(delta - b @ a) / torch.linalg.vector_norm(delta))
        energy = sum(x * x for x in s)
        optimal = math.sqrt(max(sum(x * x for x in s[rank:]), 0.0) / energy)
        ratios.append(error / optimal)
    return ratios


# -- the run ---------------------------------------------------------------------------------------------
def measure(
    label: str, cmd: list[str], runs: dict, repeat: int = 1, env: dict[str, str] | None = None
) -> None:
    """Run ``cmd`` ``repeat`` times; keep the run with the median wall time, and the load average."""
    from benchmarks.common import run_measured

    print(f"running {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = []
    for _ in range(repeat):
        load = os.getloadavg()[0]
        done.append((run_measured(cmd, env=env).check(), load))
        print(
            f"  {done[-1][0].wall_s:.1f} s, {done[-1][0].peak_rss_mb:.0f} MB, load {load:.1f}",
            file=sys.stderr,
        )
    done.sort(key=lambda item: item[0].wall_s)
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    runs[label] = (*done[len(done) // 2], prefix + " ".join(cmd), [m.wall_s for m, _ in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--extra-rank", type=int, default=32, help="a rank inside the noise spectrum")
    parser.add_argument("--root", type=Path, default=Path("/tmp/loratools-bench-extract"))
    parser.add_argument(
        "--mergekit",
        default="/work/venvs/mergekit/bin/mergekit-extract-lora",
        help="mergekit-extract-lora of a separate virtualenv (python3 -m venv V; V/bin/pip install "
        "torch==2.13.0 mergekit -c constraints.txt)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of floor and loratools (median kept)")
    parser.add_argument(
        "--rss-layers", type=int, nargs="*", default=[], help="also run loratools on these depths"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["kohya", "mergekit"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extract.md")
    args = parser.parse_args()

    from benchmarks.common import make_llama_pair

    root = args.root / f"layers{args.layers}"
    base, ft = make_llama_pair(root, layers=args.layers)
    work = root / "outputs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    py, me, r = sys.executable, str(Path(__file__).resolve()), str(args.rank)
    runs: dict = {}
    measure("warm-up (page cache)", [py, me, "floor", str(base), str(ft), str(work / "warm"), r], runs)
    measure("floor", [py, me, "floor", str(base), str(ft), str(work / "floor"), r], runs, args.repeat)
    # this interpreter, with this tree's loratools (PYTHONPATH is inherited): not an installed
    # console script, which may import another checkout
    lt = [py, "-m", "loratools.cli.main"]
    for rank in (args.rank, args.extra_rank):
        cmd = [
            *lt,
            "extract",
            str(base),
            str(ft),
            "-r",
            str(rank),
            "-o",
            str(work / f"loratools-r{rank}"),
            "--quiet",
            "--force",
        ]
        measure(f"loratools r={rank}", cmd, runs, args.repeat)
        # the default leaves a core to the readers (loratools.device.math_threads); one OpenMP
        # thread per core, the alternative, shows what that choice costs or saves on this machine
        every = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        measure(f"loratools r={rank}, all cores", cmd, runs, args.repeat, env=every)
    if "kohya" not in args.skip:
        measure("kohya-style dense", [py, me, "kohya", str(base), str(ft), str(work / "kohya"), r], runs)
    if "mergekit" not in args.skip and Path(args.mergekit).exists():
        cmd = [args.mergekit, "--model", str(ft), "--base-model", str(base), "--out-path", str(work / "mergekit"),
               "--max-rank", r]  # fmt: skip
        measure("mergekit-extract-lora", cmd, runs)
    depth_runs: dict = {}
    for layers in args.rss_layers:
        other_base, other_ft = make_llama_pair(args.root / f"layers{layers}", layers=layers)
        out = str(args.root / f"layers{layers}" / "loratools")
        cmd = [*lt, "extract", str(other_base), str(other_ft), "-r", r, "-o", out, "--quiet", "--force"]
        measure(f"loratools r={r}, {layers} layers", cmd, depth_runs)
    report(args, base, ft, work, runs, depth_runs)


def report(args: argparse.Namespace, base: Path, ft: Path, work: Path, runs: dict, depth_runs: dict) -> None:
    from benchmarks.common import machine_note, markdown_table

    spectra_file = work / "kohya" / "spectra.json"
    spectra = json.loads(spectra_file.read_text()) if spectra_file.exists() else None
    outputs = {"floor": None, f"loratools r={args.rank}": work / f"loratools-r{args.rank}",
               f"loratools r={args.extra_rank}": work / f"loratools-r{args.extra_rank}",
               f"loratools r={args.rank}, all cores": work / f"loratools-r{args.rank}",
               f"loratools r={args.extra_rank}, all cores": work / f"loratools-r{args.extra_rank}",
               "kohya-style dense": work / "kohya", "mergekit-extract-lora": work / "mergekit"}  # fmt: skip
    floor_s = runs["floor"][0].wall_s
    rows = []
    for label, (m, load, _, walls) in runs.items():
        if label.startswith("warm-up"):
            continue
        rank = args.extra_rank if f"r={args.extra_rank}" in label else args.rank
        ratios = (
            error_ratios(base, ft, outputs[label], spectra, rank) if spectra and outputs.get(label) else []
        )
        mean = f"{sum(ratios) / len(ratios):.4f}" if ratios else "–"
        worst = f"{max(ratios):.4f}" if ratios else "–"
        wall = f"{m.wall_s:.1f}" + (f" ({', '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else "")
        rows.append(
            [
                label,
                rank,
                wall,
                f"{m.wall_s / floor_s:.2f}",
                f"{m.peak_rss_mb:.0f}",
                f"{load:.1f}",
                mean,
                worst,
            ]
        )
    columns = [
        "run",
        "rank",
        "wall s (all runs)",
        "× floor",
        "peak RSS MB",
        "load avg",
        "mean err/opt",
        "worst err/opt",
    ]
    table = markdown_table(columns, rows)
    depth_rows = [[label, f"{m.wall_s:.1f}", f"{m.peak_rss_mb:.0f}"] for label, (m, *_) in depth_runs.items()]
    if depth_rows:
        table += "\n\nPeak RSS against depth:\n\n" + markdown_table(
            ["run", "wall s", "peak RSS MB"], depth_rows
        )
    commands = "\n".join(f"- {label}: `{cmd}`" for label, (_, _, cmd, _) in runs.items())
    size = sum(f.stat().st_size for f in Path(ft).glob("*.safetensors")) / 1e9
    text = (
        f"# extract benchmark ({args.layers} layers)\n\n{machine_note()}, {time.strftime('%H:%M UTC', time.gmtime())}; shared machine (other jobs running), wall time is the median of the runs listed; load avg is the 1-minute load when the kept run started. Floor: start-up (python + torch + safetensors imports) + reading both checkpoints + writing an adapter-sized file, warm page cache, measured in the same run.\n\n"
        f"Pair: `make_llama_pair(layers={args.layers})` (TinyLlama shapes, bf16, {size:.2f} GB per checkpoint).\n\n"
        f"Command: `.venv/bin/python benchmarks/bench_extract.py --layers {args.layers} --rank {args.rank} "
        f"--extra-rank {args.extra_rank} --repeat {args.repeat}"
        + (f" --rss-layers {' '.join(map(str, args.rss_layers))}" if args.rss_layers else "")
        + (f" --skip {' '.join(args.skip)}" if args.skip else "")
        + f"`\n\n{table}\n\nExact commands:\n\n{commands}\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("floor", "kohya"):
        {"floor": floor, "kohya": kohya}[sys.argv[1]](*sys.argv[2:5], int(sys.argv[5]))
    else:
        main()
