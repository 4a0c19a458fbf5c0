""":func:`extract`: plan, share the items among processes, run the pass(es), assemble the result."""

from __future__ import annotations

import math
import warnings

from loratools.distributed import Workers
from loratools.errors import LoratoolsError
from loratools.linalg import allocate_budget
from loratools.ops.delta import DeltaBuffer
from loratools.ops.extract.experts import fused_layouts
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import ExtractPlan, TensorSource, plan_extraction, size_warnings
from loratools.ops.extract.result import ExtractResult, build_result
from loratools.ops.extract.stream import factor_pass, run_everywhere, spectra_pass
from loratools.progress import Progress, no_progress


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
    buffer = DeltaBuffer(max((math.prod(i.shape) for i in lora), default=0), workers.device)
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
