"""SGLang's multi-LoRA serving (``--lora-paths``)."""

from __future__ import annotations

from loratools.ops.doctor.runtimes import Runtime, dora_undocumented, peft_lora_only

VERSION = "SGLang 0.5"

RUNTIME = Runtime(
    "sglang",
    VERSION,
    (
        peft_lora_only(
            "sglang",
            "SGLang reads PEFT LoRA folders (adapter_config.json, lora_A/lora_B weights)",
            f"{VERSION}: python/sglang/srt/lora/lora_config.py, python/sglang/srt/lora/lora.py",
        ),
        dora_undocumented(
            "sglang",
            "SGLang's LoRA guide documents plain LoRA; its config reads use_dora but its LoRA layers apply B·A only",
            f"{VERSION}: docs/advanced_features/lora.md; python/sglang/srt/lora/layers.py",
        ),
    ),
    domain="llm",
)
