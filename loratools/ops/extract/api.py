""":func:`extract`: plan, share the items among processes, run the pass(es), assemble the result;
:func:`with_dora`: the same adapter as DoRA (a second pass over both checkpoints)."""

from __future__ import annotations

import math
import warnings

from loratools.device import leaves_cores_for_io
from loratools.distributed import Workers
from loratools.errors import LoratoolsError
from loratools.linalg import allocate_budget, range_dtype
from loratools.ops.delta import DeltaBuffer
from loratools.ops.extract.dora import DoraExtractReport
from loratools.ops.extract.experts import fused_layouts
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import ExtractPlan, TensorSource, plan_extraction, size_warnings
from loratools.ops.extract.result import ExtractResult, build_result
from loratools.ops.extract.stream import factor_pass, run_everywhere, spectra_pass
from loratools.progress import Progress, no_progress


@leaves_cores_for_io(1)  # the two read-ahead threads (mostly waiting on the page cache): one core
def extract(
    base: TensorSource,
    finetuned: TensorSource,
    options: ExtractOptions,
    *,
    plan: ExtractPlan | None = None,
    workers: Workers | None = None,
    progress: Progress = no_progress,
    base_model: str | None = None,
    finetuned_model: str | None = None,
    task_type: str | None = None,
    model_class: str | None = None,
) -> ExtractResult | None:
    """Extract a LoRA adapter: ΔW = W_ft − W_base ≈ s·B·A for every targeted module.

    Args:
        base: the base checkpoint.
        finetuned: the full fine-tune of ``base``.
        options: rank rule, SVD, factor split, carrying and dtype choices.
        plan: the result of :func:`plan_extraction` if already made.
        workers: this process's share of a torchrun job, and its device (default: one CPU process).
        progress: called with each tensor name when it is done.
        base_model: name of the base for the config and model card (``base_model_name_or_path``).
        finetuned_model: name of the fine-tune, recorded in the provenance.
        task_type: PEFT task type, e.g. ``CAUSAL_LM``.
        model_class: the model class (config.json ``architectures[0]``, e.g. ``GptOssForCausalLM``):
            the layout of fused expert tensors (see :func:`~loratools.ops.extract.experts.fused_layouts`).

    Returns:
        The adapter and per-module reports; None on processes other than rank 0 of a torchrun job.

    Raises:
        ShapeMismatch: shapes differ between the checkpoints (see :func:`plan_extraction`).
        LoratoolsError: NaN/Inf in a ΔW, a budget smaller than the number of modules, nothing to extract.

    Example:
        >>> result = extract(open_checkpoint("base"), open_checkpoint("ft"), ExtractOptions(rank=8))
        >>> result.adapter.ranks["model.layers.0.self_attn.q_proj"]
        8
    """
    plan = plan or plan_extraction(base, finetuned, options)
    fused = fused_layouts(plan, model_class)  # fused expert tensors: refused before any work if unclear
    workers = workers or Workers()
    mine = workers.share(plan.items)
    lora = [item for item in mine if item.kind == "lora"]
    largest = max((math.prod(i.shape) for i in lora), default=0)
    # the randomized SVD's range finder multiplies ΔW rounded to range_dtype: formed with ΔW
    buffer = DeltaBuffer(
        largest, workers.device, rounded=None if options.exact else range_dtype(workers.device)
    )
    ranks = None
    if options.budget is not None:
        spectra = run_everywhere(
            workers, lambda: spectra_pass(base, finetuned, lora, options, buffer)
        ).spectra
        if options.budget < len(spectra):
            raise LoratoolsError(
                f"--budget {options.budget} is less than the {len(spectra)} changed modules (each needs rank ≥ 1); "
                "raise it or narrow --targets"
            )
        ranks = allocate_budget(spectra, options.budget, max_rank=options.width)
    lora_modules = {item.name.rsplit(".", 1)[0] for item in plan.lora_items}
    outcome = run_everywhere(
        workers,
        lambda: factor_pass(
            base, finetuned, mine, options, buffer, plan.dtype, ranks, lora_modules, progress, fused
        ),
    )
    if not workers.is_main:
        return None
    result = build_result(plan, outcome, options, base_model, finetuned_model, task_type, model_class)
    for message in size_warnings(result.modules, options):
        with warnings.catch_warnings():  # each run says it, even in a process that said it before
            warnings.simplefilter("always")
            warnings.warn(message, UserWarning, stacklevel=2)
    return result


def with_dora(
    base: TensorSource, finetuned: TensorSource, result: ExtractResult, progress: Progress = no_progress
) -> tuple[ExtractResult, list[DoraExtractReport]]:
    """The extracted LoRA turned into DoRA (:mod:`.dora`), streaming both checkpoints again.

    Each module's ``relative_error`` becomes ``‖W' − W_ft‖_F / ‖ΔW‖_F``; the LoRA's stays in the
    per-module DoRA reports (``lora_relative_error``).

    Returns:
        The result with the DoRA adapter, and one report per module.
    """
    from dataclasses import replace

    from loratools.ops.extract.dora import add_dora

    weights = dict(result.adapter.weights)
    names = [f"{m}.weight" for m in weights]
    pairs = (
        (b_name.removesuffix(".weight"), w0, w_ft)
        for (b_name, w0), (_, w_ft) in zip(
            base.iter_tensors(names), finetuned.iter_tensors(names), strict=True
        )
    )
    dora, reports = add_dora(pairs, weights, progress=progress)
    errors = {r.name: r.relative_error for r in reports}
    modules = [replace(m, relative_error=errors.get(m.name, m.relative_error)) for m in result.modules]
    adapter = result.adapter.with_weights({**weights, **dora}, dora=True)
    return replace(result, adapter=adapter, modules=modules), reports
