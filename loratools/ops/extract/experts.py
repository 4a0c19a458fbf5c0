"""Extract on a mixture of experts: every changed expert weight ends up in the adapter, or extract fails.

Expert weights are ordinary 2-D modules (one SVD each, see :mod:`loratools.ops.moe` for the
names); routers are carried whole when they changed. A changed expert weight that is left out
because ``--targets`` or the carrying flags miss it is an error that names it; ``--sv-threshold``
and ``--budget`` may still give an expert rank 0 (the user's own rank rule), which is reported.
Fused 3-D expert tensors (gpt-oss ``….experts.gate_up_proj`` (E, ·, ·)) are not factored yet: a
changed one is carried whole with ``--modules-to-save``, or extract fails naming it.
"""

from __future__ import annotations

from loratools.ops.extract.plan import ExtractPlan
from loratools.ops.extract.stream import Outcome
from loratools.ops.moe import ExpertCount, check_no_expert_dropped, count_experts, fused_experts, is_router

# rank rules that may legitimately give a changed module no factors
DELIBERATE = ("no singular value above --sv-threshold", "no rank left in --budget")


def expert_count(plan: ExtractPlan, outcome: Outcome) -> ExpertCount | None:
    """Expert weights factored vs in the base, routers carried; raises if a changed expert is dropped.

    Raises:
        LoratoolsError: changed expert weights that are not in the adapter (named).
    """
    base_names = [item.name for item in plan.items] + plan.only_in_base
    dropped = [n for n, why in outcome.skipped.items() if why != "unchanged" and why not in DELIBERATE]
    fused = fused_experts({item.name: item.shape for item in plan.items})
    count = count_experts(
        base_names,
        touched=list(outcome.weights),
        dropped=dropped,
        routers=[n for n in outcome.saved if is_router(n)],
        fused=fused,
    )
    if count is not None and any(n in fused for n in count.dropped):  # fused (E, ·, ·): not factored yet
        fix = "extract does not factor fused expert tensors yet: carry them whole with --modules-to-save"
    else:
        fix = "include every expert in --targets (e.g. --targets w1,w2,w3)"
    check_no_expert_dropped(count, fix)
    return count
