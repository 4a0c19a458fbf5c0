"""Extract a LoRA adapter from a full fine-tune: ΔW = W_ft − W_base, truncated SVD, ΔW ≈ s·B·A.

For every targeted 2-D weight (out, in) the fine-tune changed::

    ΔW = W_ft − W_base                          (float32, one reused buffer)
    ΔW ≈ U_r S_r V_rᵀ                           (randomized range finder, or the full SVD)
    B = U_r √S_r (out, r),  A = √S_r V_rᵀ (r, in),  alpha = r  →  scale = alpha / r = 1

By Eckart–Young the best rank-r error is ``‖ΔW − ΔW_r‖²_F = Σ_{i>r} σᵢ²``; each module reports
``relative_error = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F`` computed directly from the written (cast) factors.
The rank is fixed (``rank``), the smallest keeping a fraction of ‖ΔW‖²_F (``energy``), the count
of σᵢ ≥ ``sv_threshold``, or a model-wide ``budget`` of total rank (the largest σᵢ² anywhere).

Checkpoints are streamed tensor by tensor (the next pair is read while this one is factored), so
peak memory is about one tensor pair plus the adapter. Tensors that differ but are not LoRA
targets (norms, biases, embeddings, lm_head) are reported, and carried as ``modules_to_save``
only when asked. Under torchrun the modules are shared round-robin across processes
(:mod:`loratools.distributed`) and the main process gets the whole result.

The package, in the order data flows through it:

- :mod:`.options`: :class:`ExtractOptions`, the rank rule and every other knob, validated.
- :mod:`.plan`: match tensors by name and classify them, from the headers alone.
- :mod:`.factor`: the math on one module (ΔW buffer, truncated SVD, rank, factors, residual).
- :mod:`.stream`: the pass(es) over both checkpoints, shared among torchrun processes.
- :mod:`.result`: :class:`ExtractResult`, its ``--json`` summary and the provenance.
- :mod:`.api`: :func:`extract`, and :func:`with_dora` for a DoRA adapter.

The adapter's README.md is written by :mod:`loratools.hub.card` (one card generator), from the
command :mod:`loratools.commands.extract`.
"""

from loratools.ops.delta import DeltaBuffer
from loratools.ops.extract.api import extract, with_dora
from loratools.ops.extract.factor import (
    ModuleReport,
    choose_rank,
    lora_from_svd,
    residual_norm,
    truncated_spectrum,
)
from loratools.ops.extract.options import DEFAULT_MAX_RANK, REGEX_CHARS, ExtractOptions
from loratools.ops.extract.plan import EMBEDDING, ExtractPlan, Item, TensorSource, plan_extraction
from loratools.ops.extract.result import ExtractResult

__all__ = [
    "DEFAULT_MAX_RANK",
    "EMBEDDING",
    "REGEX_CHARS",
    "DeltaBuffer",
    "ExtractOptions",
    "ExtractPlan",
    "ExtractResult",
    "Item",
    "ModuleReport",
    "TensorSource",
    "choose_rank",
    "extract",
    "lora_from_svd",
    "plan_extraction",
    "residual_norm",
    "truncated_spectrum",
    "with_dora",
]
