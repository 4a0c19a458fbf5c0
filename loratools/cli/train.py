"""``loratools train MODEL --data FILE -o OUT``: train a LoRA adapter with the built-in loop.

Under ``torchrun --nproc-per-node N`` the same command trains data-parallel; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import device_option, force_flag, reporting


def _targets(value: str | None, regex: str | None) -> tuple[str, ...] | str:
    if regex:
        return regex
    return tuple(t.strip() for t in (value or "q_proj,v_proj").split(",") if t.strip())


@click.command()
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help=".txt or .jsonl.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option("-r", "--rank", default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha; scale = alpha / r.")
@click.option("--targets", default=None, help="Comma-separated module names [default: q_proj,v_proj].")
@click.option("--target-regex", default=None, help="Full-match regex over module paths (PEFT style).")
@click.option("--dropout", default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--rslora", is_flag=True, help="Scale by alpha / sqrt(r) (rsLoRA).")
@click.option(
    "--init",
    type=click.Choice(["kaiming", "gaussian"]),
    default="kaiming",
    show_default=True,
    help="How A starts (B starts at zero).",
)
@click.option("--steps", default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--weight-decay", default=0.0, show_default=True, help="AdamW weight decay on A and B.")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Warmup steps [default: 5% of steps].")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per micro-batch per process.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per packed sequence.")
@click.option("--max-grad-norm", default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--eval-every", default=0, show_default=True, help="Eval loss every N steps (0: at the end).")
@click.option("--eval-fraction", default=0.1, show_default=True, help="Documents held out for eval.")
@click.option(
    "--save-every", default=0, show_default=True, help="Checkpoint every N steps to OUT-checkpoints/."
)
@click.option("--seed", default=0, show_default=True, help="Seeds LoRA init, data order, split and dropout.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Base weights' dtype (LoRA factors stay float32; CUDA float32 runs under bf16 autocast).",
)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute activations: less memory, ~30% slower."
)
@click.option(
    "--tokenizer", type=click.Path(exists=True, dir_okay=False), help="tokenizer.json for text data."
)
@click.option("--adapter", "init_adapter", default=None, help="An adapter to continue training.")
@click.option("--resume", default=None, type=click.Path(exists=True), help="A checkpoint to resume exactly.")
@device_option
@force_flag
@reporting
def train(model: str, data: str, output: str, **kw: object) -> None:
    """Train a LoRA adapter on MODEL (a Llama-family folder or Hub id) with the text in --data."""
    import os

    from loratools.train.run import TrainOptions, train_adapter

    as_json, quiet, force = kw.pop("as_json"), kw.pop("quiet"), bool(kw.pop("force"))
    tokenizer, init_adapter, resume = kw.pop("tokenizer"), kw.pop("init_adapter"), kw.pop("resume")
    kw["targets"] = _targets(kw.pop("targets"), kw.pop("target_regex"))  # type: ignore[arg-type]
    kw["use_rslora"] = kw.pop("rslora")
    kw["max_grad_norm"] = kw["max_grad_norm"] or None
    opts = TrainOptions(**kw)  # type: ignore[arg-type]
    with render.progress(opts.steps, "train", quiet=bool(quiet or as_json)) as advance:
        report = train_adapter(
            model,
            data,
            output,
            opts,
            tokenizer=Path(str(tokenizer)) if tokenizer else None,
            init_adapter=str(init_adapter) if init_adapter else None,
            resume=str(resume) if resume else None,
            force=force,
            progress=advance,
            env=os.environ,  # torchrun's RANK / WORLD_SIZE: the CLI is the only environment reader
        )
    if report.rank != 0:
        return
    final_eval = report.eval_losses[max(report.eval_losses)] if report.eval_losses else None
    if as_json:
        render.emit_json({**report.__dict__, "final_loss": report.losses[-1], "eval_loss": final_eval})
        return
    rows = [
        ("output", report.output),
        ("steps", report.steps),
        ("first / last loss", f"{report.losses[0]:.4f} / {report.losses[-1]:.4f}"),
        ("eval loss", "-" if final_eval is None else f"{final_eval:.4f}"),
        ("tokens/s", f"{report.tokens_per_s:,.0f}"),
        ("trainable parameters", report.trainable_parameters),
        ("modules", len(report.modules)),
    ]
    render.table("train", ["field", "value"], rows, quiet=bool(quiet))
