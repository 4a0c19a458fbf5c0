"""Benchmark: spectrum and LoKr/LoHa → LoRA of an SDXL-shaped LyCORIS file, factored vs dense.

Same files, same run. A generated kohya/LyCORIS file holds SDXL UNet modules per transformer
block (conv 1280×1280×3×3, attn1 q/k/v/out 1280², attn2 k/v 1280×2048, ff 10240×1280 and
1280×5120), as LoKr (LyCORIS factor −1, w1 full, w2 low-rank at dim 16) or LoHa (dim 16). Each
contender runs in its own process (wall time, peak RSS):

- read: loading the file into loratools' Adapter (the floor);
- spectrum (factored): every module's singular values without ΔW — LoKr from its factors' SVDs
  (products σᵢ(W1)·σⱼ(W2)), LoHa from the factored SVD of its Khatri–Rao form (width r²);
- convert (factored): ``ops.resize.lycoris_to_lora`` at rank R (the optimal plain LoRA);
- dense: form ΔW per module, full SVD, truncate to R (what a script without the structure does).

The factored contenders run their small SVDs on one thread (as ``loratools spectrum`` and
``convert`` do), the dense SVDs on two.

Agreement: max |σ_factored − σ_dense| / σ₁ over the top 64 singular values of each module, and
the worst ratio of the factored conversion's error to the dense Eckart–Young error.

    .venv/bin/python benchmarks/bench_lycoris.py [--blocks 2] [--rank 16] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine_note, markdown_table, run_measured

BLOCK = {  # SDXL UNet (down_blocks.2 / mid / up_blocks.0): module → base weight shape
    "resnets_0_conv1": (1280, 1280, 3, 3),
    "attn1_to_q": (1280, 1280),
    "attn1_to_k": (1280, 1280),
    "attn1_to_v": (1280, 1280),
    "attn1_to_out_0": (1280, 1280),
    "attn2_to_k": (1280, 2048),
    "attn2_to_v": (1280, 2048),
    "ff_net_0_proj": (10240, 1280),
    "ff_net_2": (1280, 5120),
}
TOP = 64  # singular values compared per module


def split(n: int) -> tuple[int, int]:
    """LyCORIS ``factorization(n, -1)``: the balanced pair m ≤ n/m with m the largest divisor ≤ √n."""
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def make_file(path: Path, kind: str, blocks: int, dim: int) -> Path:
    """A deterministic float32 kohya/LyCORIS file of ``blocks`` SDXL blocks of ``kind`` modules."""
    from safetensors.torch import save_file

    if path.is_file():
        return path
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for b in range(blocks):
        for name, shape in BLOCK.items():
            stem = f"lora_unet_up_blocks_0_attentions_{b}_{name}"
            out, inp, taps = shape[0], shape[1], math.prod(shape[2:])
            if kind == "lokr":
                (a, bb), (c, d) = split(out), split(inp)
                w2_b = torch.randn(dim, d * taps, generator=gen) / (d * taps) ** 0.5
                if taps > 1:
                    w2_b = w2_b.reshape(dim, d, *shape[2:])  # the kernel stays in the file
                tensors |= {
                    f"{stem}.lokr_w1": torch.randn(a, c, generator=gen) / c**0.5,
                    f"{stem}.lokr_w2_a": torch.randn(bb, dim, generator=gen) / dim**0.5,
                    f"{stem}.lokr_w2_b": w2_b,
                }
            else:
                tensors |= {
                    f"{stem}.hada_w1_a": torch.randn(out, dim, generator=gen) / dim**0.5,
                    f"{stem}.hada_w1_b": torch.randn(dim, inp * taps, generator=gen) / (inp * taps) ** 0.5,
                    f"{stem}.hada_w2_a": torch.randn(out, dim, generator=gen) / dim**0.5,
                    f"{stem}.hada_w2_b": torch.randn(dim, inp * taps, generator=gen) / (inp * taps) ** 0.5,
                }
            tensors[f"{stem}.alpha"] = torch.tensor(float(dim) / 2)
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kind})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def worker(task: str, path: str, out: str, rank: int) -> None:
    """One contender in its own process; writes what it computed (and its own timings) to ``out``."""
    from loratools.formats import kohya
    from loratools.io.adapter_dir import read_safetensors
    from loratools.linalg import factored_svd
    from loratools.ops.resize import ResizeOptions, lycoris_to_lora

    # the small factored SVDs run on one thread, as ``loratools spectrum`` and ``convert`` run them
    # (OpenMP barriers dominate them on a busy machine); the dense SVDs get both cores
    torch.set_num_threads(1 if task == "spectrum" else 2)
    start = time.perf_counter()
    tensors, metadata = read_safetensors(Path(path))
    adapter = kohya.to_adapter(tensors, metadata, keep_stems=True, source=path)
    doc: dict[str, object] = {"read_s": time.perf_counter() - start}
    start = time.perf_counter()
    if task == "spectrum":
        spectra = {}
        for name, w in adapter.weights.items():
            s = w.singular_values() if hasattr(w, "singular_values") else factored_svd(*w.scaled_factors()).s
            spectra[name] = s[:TOP].tolist()
        doc["spectra"] = spectra
    elif task == "convert":
        _, report = lycoris_to_lora(adapter, ResizeOptions(rank=rank))
        doc["errors"] = {m.name: m.relative_error for m in report}
    elif task == "dense":
        spectra, errors = {}, {}
        for name, w in adapter.weights.items():
            delta = w.delta()  # (out, in·kh·kw), the dense ΔW
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
            spectra[name] = s[:TOP].tolist()
            errors[name] = float((delta - approx).norm() / delta.norm())
        doc["spectra"], doc["errors"] = spectra, errors
    doc["compute_s"] = time.perf_counter() - start
    Path(out).write_text(json.dumps(doc))


def measure(task: str, path: Path, root: Path, rank: int) -> tuple[dict, float, float]:
    out = root / f"{path.stem}-{task}.json"
    cmd = [sys.executable, __file__, "--worker", task, str(path), str(out), str(rank)]
    m = run_measured(cmd).check()
    return json.loads(out.read_text()), m.wall_s, m.peak_rss_mb


def run(args: argparse.Namespace) -> str:
    root = Path("/tmp/loratools-bench-lycoris")
    root.mkdir(exist_ok=True)
    lines = [
        "## LyCORIS: spectrum and LoKr/LoHa → LoRA, factored vs dense",
        "",
        f"`.venv/bin/python benchmarks/bench_lycoris.py --blocks {args.blocks} --rank {args.rank} --dim {args.dim}` "
        f"— {args.blocks} SDXL blocks × {len(BLOCK)} modules per file (conv 1280×1280×3×3, attention 1280² and "
        f"1280×2048, ff 10240×1280 and 1280×5120), dim {args.dim}, conversion rank {args.rank}; each contender in "
        "its own process (wall time of the whole process, its compute time, its peak RSS).",
        "",
    ]
    rows = []
    for kind in ("lokr", "loha"):
        path = make_file(
            root / f"sdxl-{kind}-b{args.blocks}-d{args.dim}.safetensors", kind, args.blocks, args.dim
        )
        results = {
            task: measure(task, path, root, args.rank) for task in ("read", "spectrum", "convert", "dense")
        }
        dense_doc = results["dense"][0]
        spec_doc, conv_doc = results["spectrum"][0], results["convert"][0]
        diff = max(
            max(abs(a - b) for a, b in zip(spec_doc["spectra"][n], dense_doc["spectra"][n], strict=False))
            / dense_doc["spectra"][n][0]
            for n in dense_doc["spectra"]
        )
        ratio = max(conv_doc["errors"][n] / dense_doc["errors"][n] for n in dense_doc["errors"])
        for task in ("read", "spectrum", "convert", "dense"):
            doc, wall, rss = results[task]
            rows.append(
                [kind, task, f"{wall:.1f}", f"{doc['compute_s']:.2f}", f"{rss / 1024:.2f}",
                 f"{diff:.1e}" if task == "spectrum" else (f"{ratio:.5f}" if task == "convert" else "")]
            )  # fmt: skip
        dense_s, spec_s, conv_s = (results[t][0]["compute_s"] for t in ("dense", "spectrum", "convert"))
        lines.append(
            f"- {kind}: spectrum {dense_s / spec_s:,.0f}× and conversion {dense_s / conv_s:,.0f}× faster than the "
            f"dense path (compute time); file {path.stat().st_size / 2**10:,.0f} KiB"
        )
    lines += [
        "",
        markdown_table(
            ["kind", "contender", "wall s", "compute s", "peak RSS GB", "agreement"],
            rows,
        ),
        "",
        "agreement: spectrum — max |σ_factored − σ_dense| / σ₁ over the top 64 singular values of every module; "
        "convert — worst ratio of the factored rank-R error to the dense Eckart–Young error.",
        "",
        machine_note(),
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    text = run(parser.parse_args())
    (ROOT / "benchmarks" / "results" / "lycoris.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
