"""SGLang's multi-LoRA serving (``--lora-paths``)."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, INFO, Finding
from loratools.ops.doctor.runtimes import Runtime, lora_fix

VERSION = "SGLang 0.5"


def _format(facts: AdapterFacts) -> list[Finding]:
    if facts.family == "peft" and facts.algorithm in ("LoRA", "DoRA"):
        return []
    return [Finding(
        "sglang.format", BLOCKER, "rejects",
        f"SGLang reads PEFT LoRA folders (adapter_config.json, lora_A/lora_B weights); this is {facts.label}",
        source=f"{VERSION}: python/sglang/srt/lora/lora_config.py, python/sglang/srt/lora/lora.py",
        fix=lora_fix(facts, "peft", "lora-adapter/"),
    )]  # fmt: skip


def _dora(facts: AdapterFacts) -> list[Finding]:
    if facts.algorithm != "DoRA":
        return []
    return [Finding(
        "sglang.dora", INFO, "unverified",
        "SGLang's LoRA guide documents plain LoRA; its config reads use_dora but its LoRA layers apply B·A only. "
        "Serve a plain LoRA to be sure",
        facts.of_kind("dora"), f"{VERSION}: docs/advanced_features/lora.md; python/sglang/srt/lora/layers.py",
        lora_fix(facts, "peft", "lora-adapter/"),
    )]  # fmt: skip


RUNTIME = Runtime("sglang", VERSION, (_format, _dora), domain="llm")
