"""llama.cpp: GGUF LoRA adapters (``--lora``, ``llama-export-lora``) and its converter
``convert_lora_to_gguf.py``. Checked against build 11434 in ../shared/tools/llama.cpp."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, CHANGE, Finding
from loratools.ops.doctor.runtimes import LYCORIS, Runtime, lora_fix

VERSION = "llama.cpp b11434"
CONVERTER = f"{VERSION}: convert_lora_to_gguf.py"


def _format(facts: AdapterFacts) -> list[Finding]:
    if facts.family == "gguf" or facts.algorithm != "LoRA" or facts.fused_experts:
        return []  # other algorithms and fused experts get their own finding
    return [Finding(
        "llama.cpp.format", CHANGE, "needs conversion",
        "llama.cpp loads GGUF adapters only; convert this one first (loratools folds rsLoRA and per-module "
        "alphas into the file, which llama.cpp's own converter does not)",
        source=f"{VERSION}: src/llama-adapter.cpp (llama_adapter_lora_init reads GGUF)",
        fix=lora_fix(facts, "gguf", "adapter.gguf"),
    )]  # fmt: skip


def _dora(facts: AdapterFacts) -> list[Finding]:
    if facts.algorithm != "DoRA":
        return []
    return [Finding(
        "llama.cpp.dora", BLOCKER, "rejects",
        "llama.cpp applies lora_a/lora_b pairs only (no DoRA magnitude); its converter stops at "
        "lora_magnitude_vector ('Not a lora_A or lora_B tensor')",
        facts.of_kind("dora"), f"{CONVERTER}; src/llama-adapter.cpp", lora_fix(facts, "gguf", "adapter.gguf"),
    )]  # fmt: skip


def _lycoris(facts: AdapterFacts) -> list[Finding]:
    if facts.algorithm not in (*LYCORIS, "LoCon") and not facts.conv:
        return []
    fix = lora_fix(facts, "gguf", "adapter.gguf") if facts.algorithm in LYCORIS and not facts.conv else None
    return [Finding(
        "llama.cpp.lycoris", BLOCKER, "rejects",
        f"llama.cpp adapters are lora_a/lora_b pairs on linear weights; this is {facts.label}",
        facts.conv, f"{VERSION}: src/llama-adapter.cpp", fix,
    )]  # fmt: skip


def _rslora(facts: AdapterFacts) -> list[Finding]:
    if facts.family != "peft" or not facts.rslora:
        return []
    return [Finding(
        "llama.cpp.rslora", CHANGE, "applies with a different scale",
        "llama.cpp scales by alpha/r and its converter copies lora_alpha as it is, so rsLoRA's alpha/√r "
        "becomes alpha/r: the update is √r times too small unless the scale is folded",
        facts.rslora, f"{CONVERTER} (adapter.lora.alpha = lora_alpha); src/llama-adapter.cpp",
        lora_fix(facts, "gguf", "adapter.gguf"),
    )]  # fmt: skip


def _alpha_pattern(facts: AdapterFacts) -> list[Finding]:
    if facts.family != "peft" or not facts.mixed_scales:
        return []
    return [Finding(
        "llama.cpp.alpha_pattern", CHANGE, "applies with a different scale",
        "modules do not share one alpha (alpha_pattern); llama.cpp's converter writes one adapter.lora.alpha, so "
        "the others get the wrong scale",
        source=f"{CONVERTER} (one lora_alpha for the file)", fix=lora_fix(facts, "gguf", "adapter.gguf"),
    )]  # fmt: skip


def _modules_to_save(facts: AdapterFacts) -> list[Finding]:
    if not facts.saved_modules:
        return []
    return [Finding(
        "llama.cpp.modules_to_save", BLOCKER, "rejects",
        "tensors stored whole (embed_tokens/lm_head from modules_to_save) are not LoRA pairs; llama.cpp's "
        "converter stops at them ('Embeddings is present in the adapter'); merge, then convert the merged model",
        facts.saved_modules, CONVERTER, facts.command("merge", "BASE", "ADAPTER", "-o", "merged/"),
    )]  # fmt: skip


def _fused_experts(facts: AdapterFacts) -> list[Finding]:
    if not facts.fused_experts:
        return []
    return [Finding(
        "llama.cpp.fused_experts", BLOCKER, "rejects",
        "llama.cpp loads GGUF adapters only, and loratools writes no GGUF adapter for expert tensors "
        "(fused PEFT target_parameters, or per expert); merge, then convert the merged model",
        facts.fused_experts, f"{VERSION}: src/llama-adapter.cpp; loratools convert --to gguf",
        facts.command("merge", "BASE", "ADAPTER", "-o", "merged/"),
    )]  # fmt: skip


def _tied_lm_head(facts: AdapterFacts) -> list[Finding]:
    heads = tuple(m for m in facts.kinds if m.rsplit(".", 1)[-1] == "lm_head")
    if not heads or facts.base is None or not facts.base.tied_embeddings:
        return []
    return [Finding(
        "llama.cpp.tied_lm_head", BLOCKER, "rejects",
        "the base ties lm_head to the input embedding, so its GGUF has no output tensor for this LoRA "
        "('lm_head is present in adapter, but is ignored in base model')",
        heads, CONVERTER, facts.command("merge", "BASE", "ADAPTER", "-o", "merged/"),
    )]  # fmt: skip


RUNTIME = Runtime(
    "llama.cpp",
    VERSION,
    (_format, _dora, _lycoris, _rslora, _alpha_pattern, _modules_to_save, _fused_experts, _tied_lm_head),
    domain="llm",
)
