"""Extract on a mixture of experts: every changed expert weight ends up in the adapter, or extract fails.

Per-expert 2-D weights (Mixtral ``….experts.3.w1.weight``) are ordinary modules (see
:mod:`loratools.ops.moe` for the names); routers are carried whole when they changed. Fused 3-D
expert tensors (gpt-oss ``….experts.gate_up_proj`` (E, ·, ·)) are factored one expert at a time
into PEFT's ``target_parameters`` LoRA (:mod:`loratools.kinds.fused`): module ``param[e]`` per
expert, one rank r for the E experts of a parameter. A changed expert weight that is left out
because ``--targets`` or the carrying flags miss it is an error that names it; ``--sv-threshold``
and ``--budget`` may still give an expert rank 0 (the user's own rank rule), which is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loratools.adapter import LoraWeight
from loratools.kinds.fused import FUSED_NAME, TRANSPOSED_CLASSES, FusedParam, fused_layout, wrapper_depths
from loratools.ops.extract.plan import EMBEDDING, ExtractPlan
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
    check_no_expert_dropped(count, "include every expert in --targets (e.g. --targets w1,w2,w3,gate_up_proj)")
    return count


def fused_layouts(plan: ExtractPlan, model_class: str | None) -> dict[str, tuple[FusedParam, int]]:
    """The fused expert tensors extract factors → (their layout, their PEFT nesting depth).

    Args:
        plan: the extraction plan (3-D ``lora`` items are fused expert tensors).
        model_class: the model class (config.json ``architectures[0]``), which says the layout;
            without it the hidden size (the embedding's width) does (:func:`fused_layout`).

    Raises:
        ShapeMismatch: a layout neither tells.
    """
    items = [item for item in plan.lora_items if len(item.shape) == 3]
    if not items:
        return {}
    hidden = next(
        (int(i.shape[1]) for i in plan.items if len(i.shape) == 2 and EMBEDDING.search(i.name)), None
    )
    depths = wrapper_depths([item.name for item in items])
    return {
        item.name: (
            FusedParam(item.name, item.shape, fused_layout(item.name, item.shape, model_class, hidden)),  # type: ignore[arg-type]
            depths[item.name],
        )
        for item in items
    }


def fused_config(weights: Mapping[str, LoraWeight], model_class: str | None) -> dict[str, Any]:
    """adapter_config.json fields for fused expert modules: ``target_parameters`` (their full names,
    so PEFT wraps exactly the parameters that have factors) and, for a model whose experts are
    stored (in, out), ``auto_mapping`` naming its class (how a reader tells the layout of a square
    slice)."""
    params = sorted({m["param"] for name in weights if (m := FUSED_NAME.match(name))})
    if not params:
        return {}
    config: dict[str, Any] = {"target_parameters": params}
    if model_class is not None and model_class.startswith(TRANSPOSED_CLASSES):
        config["auto_mapping"] = {"base_model_class": model_class, "parent_library": "transformers"}
    return config


def module_order(order: Iterable[str], weights: Mapping[str, Any]) -> list[str]:
    """Module names of ``weights`` in checkpoint ``order``, a fused tensor's experts ``param[e]`` in
    place of the tensor, by expert index."""
    experts: dict[str, list[str]] = {}
    for name in weights:
        if match := FUSED_NAME.match(name):
            experts.setdefault(match["param"], []).append(name)
    names = []
    for name in order:
        if name in weights:
            names.append(name)
        names += sorted(experts.get(name, []), key=lambda n: int(FUSED_NAME.match(n)["expert"]))  # type: ignore[index]
    return names
