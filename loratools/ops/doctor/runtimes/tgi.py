"""Text Generation Inference (``LORA_ADAPTERS``)."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, INFO, Finding
from loratools.ops.doctor.runtimes import Runtime, lora_fix

VERSION = "TGI 3.3"
GUIDE = f"{VERSION}: docs/source/conceptual/lora.md"


def _format(facts: AdapterFacts) -> list[Finding]:
    if facts.family == "peft" and facts.algorithm in ("LoRA", "DoRA"):
        return []
    return [Finding(
        "tgi.format", BLOCKER, "rejects",
        f"TGI serves PEFT LoRA adapters (adapter_config.json + lora_A/lora_B); this is {facts.label}",
        source=f"{VERSION}: server/text_generation_server/adapters/lora.py (LoraConfig.load)",
        fix=lora_fix(facts, "peft", "lora-adapter/"),
    )]  # fmt: skip


def _dora(facts: AdapterFacts) -> list[Finding]:
    if facts.algorithm != "DoRA":
        return []
    return [Finding(
        "tgi.dora", INFO, "unverified",
        "TGI's LoRA guide documents plain LoRA only; a DoRA magnitude is not among the weights its loader reads. "
        "Serve a plain LoRA to be sure",
        facts.of_kind("dora"), GUIDE, lora_fix(facts, "peft", "lora-adapter/"),
    )]  # fmt: skip


RUNTIME = Runtime("tgi", VERSION, (_format, _dora), domain="llm")
