"""The result of an extraction: the adapter, per-module reports, the ``--json`` summary, provenance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError
from loratools.ops.extract.embeddings import tied_embeddings, tying_config
from loratools.ops.extract.experts import expert_count, fused_config, module_order
from loratools.ops.extract.factor import ModuleReport
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.extract.plan import ExtractPlan
from loratools.ops.extract.stream import Outcome
from loratools.ops.moe import ExpertCount


@dataclass(frozen=True)
class ExtractResult:
    """The extracted adapter and what happened to every tensor.

    Attributes:
        adapter: the LoRA factors (plus carried ``modules_to_save`` tensors).
        modules: one report per factored module, in checkpoint order.
        saved: tensor names carried in full.
        skipped: tensor name → why a changed tensor is not in the adapter.
        unchanged: tensors identical in both checkpoints.
        plan: what was matched (``only_in_base``/``only_in_finetuned``).
    """

    adapter: Adapter
    modules: list[ModuleReport]
    saved: list[str]
    skipped: dict[str, str]
    unchanged: list[str]
    plan: ExtractPlan
    experts: ExpertCount | None = None  # a mixture of experts: expert weights factored vs in the base

    @property
    def energy_kept(self) -> float:
        """Model-wide ``Σ kept σᵢ² / Σ ‖ΔW‖²_F`` over the factored modules."""
        total = sum(m.delta_norm**2 for m in self.modules)
        kept = sum(m.energy_kept * m.delta_norm**2 for m in self.modules)
        return kept / total if total > 0 else 1.0

    def summary(self) -> dict[str, Any]:
        """The ``--json`` document less ``output`` (which the command's report puts first):
        modules[name, rank, relative_error], … (DESIGN.md)."""
        errors = [m.relative_error for m in self.modules]
        return {
            "base": self.adapter.provenance.get("base"),
            "finetuned": self.adapter.provenance.get("finetuned"),
            "rule": self.adapter.provenance.get("rule"),
            "dtype": str(self.plan.dtype).removeprefix("torch."),
            "parameters": self.adapter.num_parameters,
            "energy_kept": self.energy_kept,
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "max_relative_error": max(errors, default=0.0),
            "modules": [
                {
                    "name": m.name,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "energy_kept": m.energy_kept,
                    "relative_error": m.relative_error,
                    "delta_norm": m.delta_norm,
                    **(m.noise_floor.to_dict() if m.noise_floor is not None else {}),
                }
                for m in self.modules
            ],
            "saved": self.saved,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped.items()],
            "unchanged": len(self.unchanged),
            "only_in_base": self.plan.only_in_base,
            "only_in_finetuned": self.plan.only_in_finetuned,
            "tied_embeddings": self.adapter.provenance.get("tied_embeddings", []),
            "experts": self.experts.to_dict() if self.experts is not None else None,
        }


def _provenance(options: ExtractOptions, plan: ExtractPlan, base: str | None, finetuned: str | None) -> dict:
    rule_value = getattr(options, options.rule)
    return {
        "method": "extract",
        "base": base,
        "finetuned": finetuned,
        "rule": options.rule,
        options.rule: rule_value,
        "max_rank": None if options.rank is not None else options.width,
        "svd": "exact" if options.exact else "randomized",
        "seed": options.seed,
        "split": options.split,
        "alpha": options.alpha if options.alpha is not None else "rank",
        "targets": list(options.targets) if options.targets else None,
        "dtype": str(plan.dtype).removeprefix("torch."),
    }


def build_result(
    plan: ExtractPlan, outcome: Outcome, options: ExtractOptions, base: str | None, finetuned: str | None,
    task_type: str | None, model_class: str | None = None,
) -> ExtractResult:  # fmt: skip
    order = [item.name for item in plan.items]
    keys = module_order(order, outcome.weights)  # a fused tensor's experts param[e] in its place
    weights = {outcome.weights[n][1].name: outcome.weights[n][0] for n in keys}
    reports = [outcome.weights[n][1] for n in keys]
    if not weights:
        raise LoratoolsError(
            "no targeted weight differs between base and fine-tune (or every rank was 0); "
            "check the two paths, --targets and --sv-threshold"
        )
    provenance = _provenance(options, plan, base, finetuned)
    tied = tied_embeddings([*order, *plan.only_in_base, *plan.only_in_finetuned])
    if tied:
        provenance["tied_embeddings"] = tied  # one matrix for input and output: reported
    adapter = Adapter(
        weights=weights,
        saved_modules={n: outcome.saved[n] for n in order if n in outcome.saved},
        base_model=base,
        task_type=task_type,
        extra_config={**tying_config(tied, weights), **fused_config(weights, model_class)},
        provenance=provenance,
    )
    result = ExtractResult(
        adapter=adapter,
        modules=reports,
        saved=[n for n in order if n in outcome.saved],
        skipped={n: r for n in order if (r := outcome.skipped.get(n)) and r != "unchanged"},
        unchanged=[n for n in order if outcome.skipped.get(n) == "unchanged"],
        plan=plan,
        experts=expert_count(plan, outcome),
    )
    provenance["energy_kept"] = round(result.energy_kept, 6)
    return result
