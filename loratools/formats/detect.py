"""Detect an adapter's format from its tensor names — never guessing silently."""

from __future__ import annotations

from collections.abc import Sequence

from loratools.errors import UnknownFormat

__all__ = ["detect_adapter_format"]

MARKERS = {
    "peft": (".lora_A.", ".lora_B."),
    "kohya": (".lora_down.", ".lora_up."),
}
OTHER_VARIANTS = {
    ".hada_w1_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".oft_blocks": "OFT",
    ".lora_mid.": "LoCon with a mid (Tucker) factor",
}


def detect_adapter_format(keys: Sequence[str], where: str = "adapter") -> str:
    """``"peft"`` or ``"kohya"`` from the tensor names.

    Raises:
        UnknownFormat: no LoRA tensors, tensors of both conventions, or a variant that is not
            a plain LoRA (LoHa, LoKr, …), naming it.
    """
    for marker, variant in OTHER_VARIANTS.items():
        if any(marker in key for key in keys):
            raise UnknownFormat(f"{where}: a {variant} adapter; loratools handles plain LoRA only")
    found = [fmt for fmt, marks in MARKERS.items() if any(m in key for key in keys for m in marks)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UnknownFormat(
            f"{where}: no LoRA tensors found (expected PEFT '*.lora_A.weight' or kohya '*.lora_down.weight')"
        )
    raise UnknownFormat(f"{where}: holds both PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) tensors")
