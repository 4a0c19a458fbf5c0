"""``loratools extract BASE FINETUNED -r RANK -o OUT``: a full fine-tune → a PEFT LoRA adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from loratools.cli import render
from loratools.cli.options import device_option, dtype_option, force_flag, reporting, split_option

FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # names of files, not of folders


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", required=True, help="Adapter folder to create.")
@click.option("-r", "--rank", type=int, help="The same rank for every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖².")
@click.option("--sv-threshold", type=float, help="Per module, keep every singular value ≥ this.")
@click.option("--budget", type=int, help="Total rank over all modules, given to the largest σ model-wide.")
@click.option("--max-rank", type=int, help="Rank cap with --energy/--sv-threshold/--budget [default: 64].")
@click.option(
    "--targets", multiple=True, help="Leaf names (q_proj,v_proj) or one regex [default: all linears]."
)
@click.option("--exact", is_flag=True, help="Full SVD instead of the randomized one.")
@split_option
@click.option("--alpha", type=float, help="LoRA alpha for every module [default: alpha = rank, scale 1].")
@click.option("--modules-to-save", is_flag=True, help="Carry changed norms/biases/other weights in full.")
@click.option("--include-embeddings", is_flag=True, help="Carry changed embeddings and lm_head in full.")
@click.option(
    "--embeddings",
    type=click.Choice(["skip", "full", "lora"]),
    default="skip",
    show_default=True,
    help="Changed embeddings and lm_head: report them, carry them whole, or factor them as LoRA.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option(
    "--dora", is_flag=True, help="A DoRA adapter (magnitude + rank-r direction) instead of plain LoRA."
)
@dtype_option
@device_option
@force_flag
@reporting
def extract(base: str, finetuned: str, output: str, dtype: str | None, device: str, force: bool,
            as_json: bool, quiet: bool, targets: tuple[str, ...], dora: bool, **choices: object) -> None:  # fmt: skip
    """Extract a LoRA adapter from FINETUNED, a full fine-tune of BASE: ΔW ≈ (alpha/r)·B·A by truncated SVD.

    Runs under `torchrun --nproc-per-node N` too: the modules are shared, rank 0 writes.
    """
    import torch

    from loratools.device import resolve_device
    from loratools.distributed import workers_from_env
    from loratools.errors import InvalidOptions, OutputExists
    from loratools.io.adapter_dir import save_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.io.writer import check_not_an_input
    from loratools.ops.extract import ExtractOptions, model_card, plan_extraction
    from loratools.ops.extract import extract as run_extract

    names = _target_names(targets)
    options = ExtractOptions(targets=names, dtype=getattr(torch, dtype) if dtype else None, **choices)  # type: ignore[arg-type]
    if Path(output).exists() and not force:
        raise OutputExists(f"{output} already exists; pass --force to replace it")
    if Path(output).suffix.lower() in FILE_SUFFIXES:
        raise InvalidOptions(
            f"-o {output}: extract writes a PEFT adapter folder, not a {Path(output).suffix} file; name a folder "
            "(e.g. -o adapter/), then `loratools convert adapter/ --to kohya|gguf` for a single file"
        )
    base_path, ft_path = resolve_path(base), resolve_path(finetuned)
    check_not_an_input(Path(output), [base_path, ft_path])
    base_ckpt, ft_ckpt = open_checkpoint(base_path), open_checkpoint(ft_path)
    plan = plan_extraction(base_ckpt, ft_ckpt, options)
    if dora and any(len(item.shape) == 3 for item in plan.lora_items):
        raise InvalidOptions("--dora: PEFT has no DoRA for fused expert tensors (target_parameters)")
    with workers_from_env(os.environ, resolve_device(device)) as workers:
        total = len(workers.share(plan.items))
        with render.progress(total, "extract", quiet=quiet or not workers.is_main) as advance:
            result = run_extract(base_ckpt, ft_ckpt, options, plan=plan, workers=workers, progress=advance,
                                 base_model=base, finetuned_model=finetuned, task_type=_task_type(ft_path),
                                 model_class=_model_class(ft_path) or _model_class(base_path))  # fmt: skip
    if result is None:  # another torchrun process: rank 0 writes
        return
    dora_reports = _with_dora(base_ckpt, ft_ckpt, result, quiet) if dora else None
    if dora_reports is not None:
        result = dora_reports[0]
    save_adapter(result.adapter, output, force=force, readme=model_card(result))
    summary = result.summary(output)
    if dora_reports is not None:
        summary["dora"] = [r.to_dict() for r in dora_reports[1]]
    _report(summary, as_json, quiet)


def _with_dora(base_ckpt: Any, ft_ckpt: Any, result: Any, quiet: bool) -> tuple[Any, list[Any]]:
    """The extracted LoRA turned into DoRA (ops/extract/dora.py), streaming both checkpoints again;
    each module's relative error becomes ‖W' − W_ft‖/‖ΔW‖ (the LoRA's is kept in the report)."""
    from dataclasses import replace

    from loratools.ops.extract.dora import add_dora

    weights = dict(result.adapter.weights)
    names = [f"{m}.weight" for m in weights]
    pairs = (
        (b_name.removesuffix(".weight"), w0, w_ft)
        for (b_name, w0), (_, w_ft) in zip(
            base_ckpt.iter_tensors(names), ft_ckpt.iter_tensors(names), strict=True
        )
    )
    with render.progress(len(weights), "DoRA", quiet=quiet) as advance:
        dora, reports = add_dora(pairs, weights, progress=advance)
    errors = {r.name: r.relative_error for r in reports}
    modules = [replace(m, relative_error=errors.get(m.name, m.relative_error)) for m in result.modules]
    adapter = result.adapter.with_weights({**weights, **dora}, dora=True)
    return replace(result, adapter=adapter, modules=modules), reports


def _target_names(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--targets q_proj,v_proj --targets o_proj`` → leaf names; a regex is kept whole (it may hold commas)."""
    from loratools.ops.extract import REGEX_CHARS

    if not values:
        return None
    if len(values) == 1 and REGEX_CHARS & set(values[0]):
        return values
    return tuple(name for value in values for name in value.split(","))


def _architectures(model_dir: Path) -> list[str]:
    """The ``architectures`` of the folder's config.json (none for a file or a folder without one)."""
    config = model_dir / "config.json" if model_dir.is_dir() else None
    if config is None or not config.is_file():
        return []
    return [str(a) for a in json.loads(config.read_text()).get("architectures") or []]


def _task_type(model_dir: Path) -> str | None:
    """``CAUSAL_LM`` when the fine-tune's config.json names a ``…ForCausalLM`` architecture."""
    return "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in _architectures(model_dir)) else None


def _model_class(model_dir: Path) -> str | None:
    """The model class config.json names (the layout of fused expert tensors depends on it)."""
    return next(iter(_architectures(model_dir)), None)


def _report(summary: dict, as_json: bool, quiet: bool) -> None:
    skipped = summary["skipped"]
    if skipped:
        shown = ", ".join(f"{s['name']} ({s['reason']})" for s in skipped[:3])
        render.warn(
            f"{len(skipped)} changed tensor(s) not in the adapter: {shown}"
            + (" …" if len(skipped) > 3 else "")
        )
    new = summary["only_in_finetuned"]
    if new:
        render.warn(f"{len(new)} tensor(s) only in the fine-tune, not carried: {', '.join(new[:3])}")
    if as_json:
        render.emit_json(summary)
        return
    rows = [(m["name"], m["rank"], m["energy_kept"], m["relative_error"]) for m in summary["modules"]]
    render.table(f"extracted → {summary['output']}", ["module", "rank", "energy kept", "relative error"], rows,
                 quiet=quiet)  # fmt: skip
    if not quiet:
        render.note(f"{len(rows)} modules, {summary['parameters']:,} parameters, energy kept "
                    f"{summary['energy_kept']:.4f}, mean relative error {summary['mean_relative_error']:.4g}")  # fmt: skip
