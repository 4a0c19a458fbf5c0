"""``loratools train MODEL --data FILE -o OUT``: train a LoRA adapter with the built-in loop.

Under ``torchrun --nproc-per-node N`` the same command trains data-parallel; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from loratools.cli import render
from loratools.cli.options import device_option, force_flag, reporting
from loratools.train.options import DTYPES, INITS, TrainOptions


def _targets(value: str | None, regex: str | None) -> tuple[str, ...] | str:
    if regex:
        return regex
    if value is None:
        return TrainOptions.targets
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _default(name: str) -> dict[str, Any]:
    """click's ``default`` and ``show_default`` for the TrainOptions field ``name``: one definition."""
    return {"default": getattr(TrainOptions, name), "show_default": True}


@click.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help=".txt or .jsonl.")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter folder to write."
)
@click.option("-r", "--rank", **_default("rank"), help="LoRA rank r.")
@click.option("--alpha", **_default("alpha"), help="LoRA alpha; scale = alpha / r.")
@click.option("--targets", default=None, help="Comma-separated module names [default: q_proj,v_proj].")
@click.option("--target-regex", default=None, help="Full-match regex over module paths (PEFT style).")
@click.option("--dropout", **_default("dropout"), help="LoRA dropout.")
@click.option("--rslora", "use_rslora", is_flag=True, help="Scale by alpha / sqrt(r) (rsLoRA).")
@click.option("--init", type=click.Choice(INITS), **_default("init"), help="How A starts (B starts at zero).")
@click.option("--steps", **_default("steps"), help="Optimizer steps.")
@click.option("--lr", **_default("lr"), help="Peak learning rate.")
@click.option(
    "--min-lr-ratio", **_default("min_lr_ratio"), help="The cosine decays to this fraction of --lr."
)
@click.option("--weight-decay", **_default("weight_decay"), help="AdamW weight decay on A and B.")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Warmup steps [default: 5% of steps].")
@click.option("--batch-size", **_default("batch_size"), help="Sequences per micro-batch per process.")
@click.option("--grad-accum", **_default("grad_accum"), help="Micro-batches per optimizer step.")
@click.option("--seq-len", **_default("seq_len"), help="Tokens per packed sequence.")
@click.option("--max-grad-norm", **_default("max_grad_norm"), help="Gradient clipping (0: off).")
@click.option("--eval-every", **_default("eval_every"), help="Eval loss every N steps (0: at the end).")
@click.option("--eval-fraction", **_default("eval_fraction"), help="Documents held out for eval.")
@click.option("--save-every", **_default("save_every"), help="Checkpoint every N steps to OUT-checkpoints/.")
@click.option("--seed", **_default("seed"), help="Seeds LoRA init, data order, split and dropout.")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    **_default("dtype"),
    help="Base weights' dtype (LoRA factors stay float32; CUDA float32 runs under bf16 autocast).",
)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute activations: less memory, ~30% slower."
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="tokenizer.json for text data.",
)
@click.option("--adapter", "init_adapter", default=None, help="An adapter to continue training.")
@click.option("--resume", default=None, type=click.Path(exists=True), help="A checkpoint to resume exactly.")
@device_option
@force_flag
@reporting
def train(model: str, data: str, output: Path, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Train a LoRA adapter on MODEL (a Llama-family folder or Hub id) with the text in --data."""
    import os

    from loratools.commands.train import TrainJob, open_train

    job = {name: kw.pop(name) for name in ("tokenizer", "init_adapter", "resume", "force")}
    kw["targets"] = _targets(kw.pop("targets"), kw.pop("target_regex"))
    kw["max_grad_norm"] = kw["max_grad_norm"] or None
    # torchrun's RANK / WORLD_SIZE: the CLI is the only environment reader
    opened = open_train(TrainJob(model, Path(data), output, TrainOptions(**kw), **job, env=os.environ))
    with render.progress(opened.total, "train", quiet=quiet or as_json) as advance:
        report = opened.run(advance)
    if report is None:  # another torchrun process: rank 0 reports
        return
    if as_json:
        render.emit_json(report.to_dict())
        return
    final_eval = report.eval_loss
    rows = [
        ("output", report.output),
        ("steps", report.steps),
        ("first / last loss", f"{report.losses[0]:.4f} / {report.losses[-1]:.4f}"),
        ("eval loss", "-" if final_eval is None else f"{final_eval:.4f}"),
        ("tokens/s", f"{report.tokens_per_s:,.0f}"),
        ("trainable parameters", report.trainable_parameters),
        ("modules", len(report.modules)),
    ]
    render.table("train", ["field", "value"], rows, quiet=quiet)
