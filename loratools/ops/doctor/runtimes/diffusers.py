"""diffusers: ``pipeline.load_lora_weights`` for Stable Diffusion / SDXL (kohya files are converted
by ``_convert_non_diffusers_lora_to_diffusers``)."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, Finding
from loratools.ops.doctor.runtimes import LYCORIS, Runtime, lora_fix, not_a_diffusion_adapter

VERSION = "diffusers 0.42"
CONVERSION = f"{VERSION}: loaders/lora_conversion_utils.py (_convert_non_diffusers_lora_to_diffusers)"


_not_diffusion = not_a_diffusion_adapter(
    "diffusers.not_a_pipeline_adapter",
    BLOCKER,
    "rejects",
    "load_lora_weights adapts diffusion pipelines (UNet / transformer, text encoders); these module names are not of one",
    f"{VERSION}: loaders/lora_pipeline.py (load_lora_into_unet / text_encoder)",
)


def _lycoris(facts: AdapterFacts) -> list[Finding]:
    if not facts.diffusion or facts.family != "kohya" or facts.algorithm not in LYCORIS:
        return []
    return [Finding(
        "diffusers.lycoris", BLOCKER, "rejects",
        "the SD/SDXL kohya converter renames lora_down/lora_up/alpha/dora_scale keys only and raises "
        f"'The following keys have not been correctly renamed' for the rest; this is {facts.label}",
        source=CONVERSION, fix=lora_fix(facts, "kohya", "lora.safetensors"),
    )]  # fmt: skip


RUNTIME = Runtime("diffusers", VERSION, (_not_diffusion, _lycoris), domain="diffusion")
