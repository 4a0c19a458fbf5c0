"""vLLM's LoRA serving (``--enable-lora``, ``--lora-modules``)."""

from __future__ import annotations

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, INFO, Finding
from loratools.ops.doctor.runtimes import Runtime, lora_fix, peft_lora_only

VERSION = "vLLM 0.11"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
DEFAULT_MAX_LORA_RANK = 16
HELPER = f"{VERSION}: vllm/lora/peft_helper.py (PEFTHelper._validate_features)"


_format = peft_lora_only(
    "vllm",
    "vLLM loads PEFT LoRA folders (lora_A/lora_B) only",
    f"{VERSION}: vllm/lora/utils.py (parse_fine_tuned_lora_name: 'unsupported LoRA weight')",
)


def _dora(facts: AdapterFacts) -> list[Finding]:
    if facts.algorithm != "DoRA":
        return []
    return [Finding(
        "vllm.dora", BLOCKER, "rejects", "vLLM does not yet support DoRA (use_dora)",
        facts.of_kind("dora"), HELPER, lora_fix(facts, "peft", "lora-adapter/"),
    )]  # fmt: skip


def _fused_experts(facts: AdapterFacts) -> list[Finding]:
    if not facts.fused_experts:
        return []
    return [Finding(
        "vllm.fused_experts", INFO, "unverified",
        "these rules were read from vLLM's per-module LoRA loader (lora_A/lora_B of target_modules); fused "
        "expert parameters (PEFT target_parameters) were not checked. Serve the merged model to be sure",
        facts.fused_experts, f"{VERSION}: vllm/lora/utils.py", facts.command("merge", "BASE", "ADAPTER", "-o", "merged/"),
    )]  # fmt: skip


def _modules_to_save(facts: AdapterFacts) -> list[Finding]:
    if not facts.saved_modules:
        return []
    return [Finding(
        "vllm.modules_to_save", BLOCKER, "rejects",
        "vLLM only supports modules_to_save being None; these tensors are stored whole",
        facts.saved_modules, HELPER, facts.command("merge", "BASE", "ADAPTER", "-o", "merged/"),
    )]  # fmt: skip


def _max_rank(facts: AdapterFacts) -> list[Finding]:
    rank = facts.max_rank
    if rank <= DEFAULT_MAX_LORA_RANK:
        return []
    allowed = next((r for r in MAX_LORA_RANKS if r >= rank), None)
    serve = (
        f"; or serve with --max-lora-rank {allowed}"
        if allowed
        else f"; vLLM accepts at most {MAX_LORA_RANKS[-1]}"
    )
    over = tuple(m for m, r in facts.ranks.items() if r > DEFAULT_MAX_LORA_RANK)
    return [Finding(
        "vllm.max_lora_rank", BLOCKER, "rejects",
        f"LoRA rank {rank} is greater than max_lora_rank {DEFAULT_MAX_LORA_RANK} (vLLM's default){serve}",
        over, f"{VERSION}: vllm/lora/worker_manager.py (_load_lora), vllm/config/lora.py (max_lora_rank)",
        facts.command("resize", "ADAPTER", "-r", str(DEFAULT_MAX_LORA_RANK), "-o", "resized/"),
    )]  # fmt: skip


RUNTIME = Runtime(
    "vllm", VERSION, (_format, _dora, _modules_to_save, _fused_experts, _max_rank), domain="llm"
)
