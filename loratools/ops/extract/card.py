"""The adapter's README.md: what it was extracted from, how, its ranks and the energy kept."""

from __future__ import annotations

import re

from loratools.ops.extract.result import ExtractResult

# ``org/name[@revision]``: only a Hub id may be the card's base_model (the Hub links it to a model
# page). A local path such as ``/models/base`` or ``./base`` is left out; ``push`` also drops an
# ``org/name`` that turns out to be a local folder. The id's characters need no YAML quoting.
HUB_MODEL = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@[\w./-]+)?")


def model_card(result: ExtractResult) -> str:
    """A README.md for the adapter: what it was extracted from, how, its ranks and the energy kept."""
    p = result.adapter.provenance
    ranks = sorted({m.rank for m in result.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per module, rank_pattern)"
    errors = [m.relative_error for m in result.modules]
    hub_base = HUB_MODEL.fullmatch(str(p.get("base") or ""))
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {hub_base['repo']}"] if hub_base else []),
        "tags: [lora, loratools, extracted]",
        "---",
        "",
        "# LoRA adapter extracted with loratools",
        "",
        f"Extracted from the full fine-tune `{p.get('finetuned')}` of the base `{p.get('base')}`: for each",
        "targeted weight, ΔW = W_ft − W_base was factored by a truncated SVD into ΔW ≈ (alpha/r)·B·A.",
        "",
        "| | |",
        "|---|---|",
        f"| modules | {len(result.modules)} |",
        f"| rank | {rank_text} |",
        f"| rank rule | {p['rule']} = {p[p['rule']]} |",
        f"| SVD | {p['svd']} (seed {p['seed']}), split {p['split']} |",
        f"| energy kept (Σ kept σ² / Σ ‖ΔW‖²) | {result.energy_kept:.4f} |",
        f"| relative error ‖ΔW − sBA‖/‖ΔW‖ | mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g} |",
        f"| dtype | {p['dtype']} |",
        f"| modules saved in full | {len(result.saved)} |",
        "",
        "Load it with PEFT: `PeftModel.from_pretrained(base_model, this_folder)`.",
        "",
    ]
    return "\n".join(lines)
