"""``loratools convert SOURCE --to peft|kohya|gguf|safetensors -o OUT``: adapters and models."""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import force_flag, reporting
from loratools.formats.detect import KOHYA_PREFIX

DTYPE_CHOICES = ["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
TARGETS = {
    "peft": "a PEFT adapter folder",
    "kohya": "a kohya .safetensors adapter",
    "gguf": "a llama.cpp GGUF adapter",
    "safetensors": "a safetensors model folder",
}


@click.command()
@click.argument("source")
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["peft", "kohya", "gguf", "safetensors"]),
    help="peft/kohya/gguf for adapters; safetensors for models (.bin, .pt, .gguf).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (peft, safetensors) or file (kohya, gguf).",
)
@click.option(
    "--base", default=None, help="Base model: resolves kohya names; its config.json is needed for gguf."
)
@click.option(
    "--prefix", default=KOHYA_PREFIX, show_default=True, help="kohya key prefix (lora_unet, lora_te, …)."
)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Output dtype (default: keep).")
@click.option("--max-shard-size", default=None, help="Model shard size limit, e.g. 5GB (default 5GB).")
@click.option(
    "-r", "--rank", type=int, default=None, help="DoRA (needs --base), LoHa, LoKr → plain LoRA of this rank."
)
@click.option(
    "--energy",
    type=float,
    default=None,
    help="DoRA (needs --base), LoHa, LoKr → plain LoRA keeping this energy fraction.",
)
@click.option("--budget", type=int, default=None, help="LoHa, LoKr → plain LoRA of this total rank.")
@click.option(
    "--split-experts",
    is_flag=True,
    help="Fused-expert LoRA → per-expert experts.<e>.<proj> modules (needs --base).",
)
@force_flag
@reporting
def convert(
    source: str,
    to: str,
    output: Path,
    base: str | None,
    prefix: str,
    dtype: str | None,
    max_shard_size: str | None,
    rank: int | None,
    energy: float | None,
    budget: int | None,
    split_experts: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert SOURCE: an adapter to PEFT, kohya or llama.cpp GGUF, or a model to safetensors.

    \b
      loratools convert ADAPTER --to kohya -o lora.safetensors [--prefix lora_te]
      loratools convert lora.safetensors --to peft -o DIR --base BASE
      loratools convert ADAPTER --to gguf -o lora.gguf --base BASE_DIR
      loratools convert model.bin|model.gguf --to safetensors -o DIR [--dtype bf16]
      loratools convert DORA --to gguf -o lora.gguf --base BASE -r 16   # DoRA → plain LoRA
      loratools convert LOKR --to kohya -o lora.safetensors --energy 0.99  # LoHa/LoKr → LoRA
      loratools convert ADAPTER --to peft -o DIR --base BASE --split-experts  # per-expert names
    """
    from loratools.commands.convert import ConvertOptions, open_convert

    options = ConvertOptions(
        source, to, output, base, prefix, dtype, max_shard_size, force, rank, energy, budget=budget,
        split_experts=split_experts,
    )  # fmt: skip
    opened = open_convert(options)
    with render.progress(opened.total, f"convert → {to}", quiet=quiet or as_json) as advance:
        report = opened.run(advance).to_dict()
    if not (quiet or as_json):  # after the work: a refusal stays the only line on stderr
        render.note(f"{source}: {opened.source_kind} → {TARGETS[to]}")
    if as_json:
        render.emit_json(report)
        return
    rows = [
        (key, str(value))
        for key, value in report.items()
        if key not in ("modules", "config", "files", "notes", "dora_baked", "lycoris_converted")
    ]
    render.table(f"convert {source}", ["field", "value"], rows, quiet=quiet)
    if report.get("dora_baked"):
        baked = [
            (m["name"], str(m["rank"]), f"{m['relative_error']:.4f}", f"{m['energy_kept']:.4f}")
            for m in report["dora_baked"]
        ]
        render.table("DoRA → LoRA", ["module", "rank", "relative error", "energy kept"], baked, quiet=quiet)
    if report.get("lycoris_converted"):
        converted = [
            (m["name"], m["kind"], str(m["rank"]), f"{m['relative_error']:.4f}", f"{m['energy_kept']:.4f}")
            for m in report["lycoris_converted"]
        ]
        columns = ["module", "kind", "rank", "relative error", "energy kept"]
        render.table("LoHa/LoKr → LoRA", columns, converted, quiet=quiet)
    for note in report.get("notes", []):
        render.note(note)
