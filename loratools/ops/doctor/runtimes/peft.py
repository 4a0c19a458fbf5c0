"""PEFT (the reference loader of the PEFT format): ``PeftModel.from_pretrained``."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, INFO, Finding
from loratools.ops.doctor.runtimes import Runtime, lora_fix

VERSION = "peft 0.21"


def _format(facts: AdapterFacts) -> list[Finding]:
    if facts.family == "peft":
        return []
    fix = lora_fix(facts, "peft", "peft-adapter/") if facts.family in ("kohya", "cloneofsimo") else None
    return [Finding(
        "peft.format", BLOCKER, "rejects",
        f"PEFT reads adapter_config.json with base_model.model.<module>.lora_A/lora_B tensors; this is {facts.label}",
        source=f"{VERSION}: peft/config.py (PeftConfig.from_pretrained needs adapter_config.json)", fix=fix,
    )]  # fmt: skip


def _recorded_base(facts: AdapterFacts) -> list[Finding]:
    base = facts.base
    if base is None or not base.recorded or base.recorded.rstrip("/").split("/")[-1] in base.path:
        return []
    return [Finding(
        "peft.recorded_base", INFO, "loads onto the model it is given",
        f"the adapter records base_model_name_or_path {base.recorded!r}, not {base.path}; PEFT does not check",
        source=f"{VERSION}: peft/peft_model.py (PeftModel.from_pretrained takes the model as given)",
    )]  # fmt: skip


RUNTIME = Runtime("peft", VERSION, (_format, _recorded_base))
