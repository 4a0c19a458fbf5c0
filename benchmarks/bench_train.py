"""Training benchmark: ``loratools train`` vs PEFT + transformers, same model, data, batch and steps.

    python benchmarks/bench_train.py [--layers 4] [--hidden 512] [--steps 20] [--batch-size 4]
                                     [--seq-len 256] [--rank 8] [--root /tmp/loratools-bench-train]

Model: make_llama_pair's bf16 Llama-shaped base (defaults: 4 layers, hidden 512, MLP 1408, 8
heads / 2 kv heads, vocab 32000 ≈ 44 M parameters), trained in float32 on CPU with a rank-8 LoRA
on q_proj and v_proj (alpha 16, no dropout), AdamW at lr 1e-4, no gradient checkpointing.
Data: deterministic random token ids, pre-tokenized .jsonl, one packed row per document.

Each side runs in its own process (run_measured: wall time and peak RSS):
- loratools: ``loratools train BASE --data ids.jsonl -o OUT --json --eval-fraction 0``;
  tokens/s is the loop's own figure (weights loaded, optimizer steps only).
- peft:      transformers ``from_pretrained(dtype=float32)`` → ``get_peft_model(LoraConfig(...))``
  → the same hand-written loop (AdamW, warmup+cosine, clipping at 1.0), tokens/s timed the same way.
  (No HF Trainer: its extra bookkeeping would only slow the reference down.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_note, make_llama_pair, markdown_table, run_measured

PEFT_WORKER = r"""
import json, math, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base, data, steps, batch, rank, lr = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
torch.manual_seed(0)
rows = torch.tensor([json.loads(line)["input_ids"] for line in open(data)])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
warmup = max(1, steps // 20)
model.train()
losses, start = [], time.perf_counter()
gen = torch.Generator().manual_seed(0)
for step in range(steps):
    rate = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in opt.param_groups:
        group["lr"] = rate
    ids = rows[torch.randint(0, len(rows), (batch,), generator=gen)]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": steps * batch * rows.shape[1] / seconds, "losses": losses}))
"""


def make_data(path: Path, rows: int, seq_len: int, vocab: int) -> Path:
    """``rows`` documents of ``seq_len`` random token ids (seeded), one JSON object per line."""
    import torch

    if not path.is_file():
        ids = torch.randint(3, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))
        path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    return path


def run(args: argparse.Namespace) -> str:
    root = Path(args.root)
    base, _ = make_llama_pair(
        root, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=8, kv_heads=2
    )
    data = make_data(root / f"ids-{args.seq_len}.jsonl", 256, args.seq_len, 32000)
    out = root / "out-loratools"
    ours_cmd = [
        sys.executable, "-m", "loratools.cli.main", "train", str(base), "--data", str(data), "-o", str(out),
        "--force", "--json", "--device", "cpu", "--eval-fraction", "0", "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "-r", str(args.rank),
        "--alpha", str(2 * args.rank), "--lr", "1e-4",
    ]  # fmt: skip
    peft_cmd = [sys.executable, "-c", PEFT_WORKER, str(base), str(data), str(args.steps)]
    peft_cmd += [str(args.batch_size), str(args.rank), "1e-4"]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    runs: dict[str, list[tuple[float, float, float, list[float]]]] = {
        "loratools": [],
        "peft+transformers": [],
    }
    for _ in range(args.repeat):  # interleaved, so both sides see the same machine load
        for name, cmd in (("loratools", ours_cmd), ("peft+transformers", peft_cmd)):
            m = run_measured(cmd, env={"PYTHONPATH": str(ROOT), **threads}).check()
            report = json.loads(m.stdout)
            runs[name].append((report["tokens_per_s"], m.wall_s, m.peak_rss_mb, report["losses"]))
            print(
                f"{name}: {report['tokens_per_s']:.0f} tok/s, {m.wall_s:.1f} s, {m.peak_rss_mb:.0f} MB",
                file=sys.stderr,
            )
    results = {name: _median(measured) for name, measured in runs.items()}
    ours, peft = results["loratools"], results["peft+transformers"]
    rows = [
        [
            name,
            round(tps),
            f"{tps / peft[0]:.2f}×",
            round(wall, 1),
            round(rss),
            f"{losses[0]:.3f} → {losses[-1]:.3f}",
        ]
        for name, (tps, wall, rss, losses) in results.items()
    ]
    table = markdown_table(
        ["tool", "tokens/s (loop)", "vs peft", "wall s (incl. load)", "peak RSS MB", "loss first → last"],
        rows,
    )
    params = _parameters(args)
    return (
        f"Model: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, 8/2 heads, vocab 32000 "
        f"(≈{params / 1e6:.0f} M parameters), float32 on CPU; LoRA r={args.rank} on q_proj,v_proj; "
        f"batch {args.batch_size} × seq {args.seq_len}, {args.steps} steps; median of {args.repeat} "
        f"interleaved run(s) per side; threads: {args.threads or 'torch default'}.\n\n{table}\n\n"
        f"tokens/s ratio loratools/peft = {ours[0] / peft[0]:.2f}; "
        f"peak RSS ratio = {ours[2] / peft[2]:.2f}\n\nMachine: {machine_note()}\n"
    )


def _median(runs: list[tuple[float, float, float, list[float]]]) -> tuple[float, float, float, list[float]]:
    """Per-column medians of repeated runs (the losses of the first run: they are deterministic)."""
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        statistics.median(r[2] for r in runs),
        runs[0][3],
    )


def _parameters(args: argparse.Namespace) -> int:
    h, i, v, kv = args.hidden, args.intermediate, 32000, 2 * (args.hidden // 8)
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    return args.layers * per_layer + 2 * v * h + h


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="Interleaved runs per side; medians reported.")
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: torch's default)."
    )
    parser.add_argument("--root", default="/tmp/loratools-bench-train")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = run(args)
    print(f"Run {started}: python benchmarks/bench_train.py {' '.join(sys.argv[1:])}\n\n{body}")


if __name__ == "__main__":
    main()
