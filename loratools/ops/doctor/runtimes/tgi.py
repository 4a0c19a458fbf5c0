"""Text Generation Inference (``LORA_ADAPTERS``)."""

from __future__ import annotations

from loratools.ops.doctor.runtimes import Runtime, dora_undocumented, peft_lora_only

VERSION = "TGI 3.3"

RUNTIME = Runtime(
    "tgi",
    VERSION,
    (
        peft_lora_only(
            "tgi",
            "TGI serves PEFT LoRA adapters (adapter_config.json + lora_A/lora_B)",
            f"{VERSION}: server/text_generation_server/adapters/lora.py (LoraConfig.load)",
        ),
        dora_undocumented(
            "tgi",
            "TGI's LoRA guide documents plain LoRA only; a DoRA magnitude is not among the weights its loader reads",
            f"{VERSION}: docs/source/conceptual/lora.md",
        ),
    ),
    domain="llm",
)
