"""ComfyUI's LoraLoader (comfy/lora.py and comfy/weight_adapter/)."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, Finding
from loratools.ops.doctor.runtimes import Runtime, not_a_diffusion_adapter

VERSION = "ComfyUI 0.3"
LOADED = ("LoRA", "LoCon", "LoHa", "LoKr", "DoRA", "GLoRA", "OFT", "BOFT", "full/diff")


_not_diffusion = not_a_diffusion_adapter(
    "comfyui.unmatched_keys",
    BLOCKER,
    "ignores silently",
    "ComfyUI maps keys onto diffusion-model weights; every key of this adapter is unmatched, logged as "
    "'lora key not loaded' and skipped, so nothing is applied",
    f"{VERSION}: comfy/lora.py (load_lora, model_lora_keys_unet)",
)


def _algorithm(facts: AdapterFacts) -> list[Finding]:
    if not facts.diffusion or facts.algorithm in LOADED:
        return []
    return [Finding(
        "comfyui.algorithm", BLOCKER, "ignores silently",
        f"ComfyUI's weight adapters are {', '.join(LOADED)}; the keys of {facts.label} are skipped "
        "('lora key not loaded')",
        source=f"{VERSION}: comfy/weight_adapter/__init__.py (adapters)",
    )]  # fmt: skip


RUNTIME = Runtime("comfyui", VERSION, (_not_diffusion, _algorithm), domain="diffusion")
