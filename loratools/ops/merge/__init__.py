"""Merge adapters into base weights, take them out again, or swap one for another — streaming.

The paper's deployment story (Hu et al., 2021, §4.1, https://arxiv.org/abs/2106.09685): keep
one (A, B) per task, bake ``s·B·A`` into the frozen weight for zero-latency inference, and
switch tasks by subtracting one product and adding another. For every adapted base tensor::

    W = W0 + Σᵢ wᵢ · sᵢ · Bᵢ @ Aᵢ         W0: (out, in), Bᵢ: (out, rᵢ), Aᵢ: (rᵢ, in)

with wᵢ > 0 for adapters added (merge) and wᵢ < 0 for adapters removed (unmerge); a swap is
one pass with both. The sum runs in float32 as one matmul of the stacked factors
``[w₁s₁B₁ | w₂s₂B₂ | …] @ [A₁; A₂; …]`` added in place into a float32 copy of W0, then cast
once to the output dtype. ``modules_to_save`` tensors replace the base tensor whole.

The base is streamed tensor by tensor in storage order (the next tensor is read while this one
is computed); tensors no adapter touches are copied as their stored bytes, so untouched files
are byte-identical. Peak memory is about two float32 copies of the largest adapted tensor plus
the adapters.

Precision report, per adapted tensor (Δ = Σ wᵢsᵢBᵢAᵢ, computed from the factors)::

    relative_delta = ‖Δ‖_F / ‖W0‖_F
    lost_fraction  = ‖round(W0 + Δ) − W0 − Δ‖_F / ‖Δ‖_F               (output dtype = W0's)
                   = 1 − ⟨round(W0 + Δ) − round(W0), Δ⟩ / ‖Δ‖²          (narrower output dtype)

the share of the update destroyed by rounding to the output dtype (0 to 1); a narrower output
also reports ``base_rounding = ‖round(W0) − W0‖ / ‖Δ‖``, the cast of the base itself (see
:mod:`.precision`). An update far below the dtype's resolution (bf16 keeps 8 bits:
‖Δ‖/‖W0‖ ≈ 4e-5 ≪ 2⁻⁹) vanishes almost entirely.

The package, in the order data flows through it:

- :mod:`.terms`: what to do — MergeTerm, MergeOptions, TensorUpdate.
- :mod:`.plan`: match every adapter to the base and check it fits, before anything is written.
- :mod:`.update`: the math on one tensor (stacked factors, one ``addmm``, the precision stats).
- :mod:`.stream`: the pass over the base's tensors (the caller reads ahead and writes behind).
- :mod:`.precision`: the per-tensor records and the report with its warnings.
- :mod:`.requant`: ``--keep-quantization``'s math (requantized update, what survives).
- :mod:`.dora`, :mod:`.fused`, :mod:`.growth`: DoRA, fused experts, a grown vocabulary.

Nothing here opens a file: :mod:`loratools.commands.merge` resolves the paths, opens the base and
the adapters and writes the output (:func:`~loratools.commands.merge.merge_paths`).
"""

from loratools.ops.merge.plan import MergePlan as MergePlan  # what plan_merge returns
from loratools.ops.merge.plan import plan_merge
from loratools.ops.merge.precision import MergeResult, ModuleStats
from loratools.ops.merge.stream import merged_tensors, storage_order
from loratools.ops.merge.terms import MergeOptions, MergeTerm, TensorUpdate
from loratools.ops.merge.update import apply_update, delta_norm, stacked_factors

__all__ = [
    "MergeOptions",
    "MergeResult",
    "MergeTerm",
    "ModuleStats",
    "TensorUpdate",
    "apply_update",
    "delta_norm",
    "merged_tensors",
    "plan_merge",
    "stacked_factors",
    "storage_order",
]
