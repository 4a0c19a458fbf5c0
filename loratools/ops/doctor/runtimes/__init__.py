"""The runtimes ``doctor`` knows, one file each: its version, and the rules read from its code.

Adding a runtime is one file here that defines ``RUNTIME`` plus one line in :data:`RUNTIMES`.
A rule is a function ``AdapterFacts -> list[Finding]``; docs/doctor.md lists every rule with its
source, and says how to re-check them when a runtime releases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, INFO, Finding, RuntimeVerdict

__all__ = [
    "RUNTIMES",
    "Rule",
    "Runtime",
    "dora_undocumented",
    "lora_fix",
    "not_a_diffusion_adapter",
    "peft_lora_only",
    "runtime_names",
]

Rule = Callable[[AdapterFacts], list[Finding]]
LYCORIS = ("LoHa", "LoKr")


@dataclass(frozen=True)
class Runtime:
    """A runtime: its name, the version its rules were read from, the rules, and what it runs:
    ``llm`` (language models), ``diffusion`` (image/video pipelines) or ``any``."""

    name: str
    version: str
    rules: Sequence[Rule]
    domain: str = "any"

    def applies_to(self, facts: AdapterFacts) -> bool:
        """Whether this runtime runs models of the adapter's kind (a diffusion runtime for an LLM's
        adapter does not): checked by default only when it does."""
        return self.domain == "any" or (self.domain == "diffusion") == facts.diffusion

    def check(self, facts: AdapterFacts) -> RuntimeVerdict:
        """Every finding this runtime's rules make, in rule order."""
        findings = tuple(f for rule in self.rules for f in rule(facts))
        return RuntimeVerdict(self.name, self.version, findings)


def lora_fix(facts: AdapterFacts, to: str, output: str) -> str:
    """The loratools command that turns this adapter into a plain LoRA in format ``to``.

    DoRA needs the base (its update depends on W0); LoHa/LoKr are converted at their own top rank
    (the optimal rank-r LoRA of the exact ΔW); a kohya LoRA without dotted names needs the base to
    name its modules for PEFT; a GGUF adapter always needs it (for the architecture).
    """
    rank = ["-r", str(max(facts.max_rank, 1))]
    if to == "gguf":  # the GGUF adapter names the base's architecture, so the base is always needed
        rank_rule = rank if facts.algorithm in ("DoRA", *LYCORIS) else []
        return facts.command("convert", "ADAPTER", "--to", to, *rank_rule, "--base", "BASE", "-o", output)
    if facts.algorithm == "DoRA":
        return facts.command("convert", "ADAPTER", "--to", to, *rank, "--base", "BASE", "-o", output)
    if facts.algorithm in LYCORIS:
        return facts.command("convert", "ADAPTER", "--to", to, *rank, "-o", output)
    if facts.family in ("kohya", "cloneofsimo") and to == "peft":
        return facts.command("convert", "ADAPTER", "--to", to, "--base", "BASE", "-o", output)
    return facts.command("convert", "ADAPTER", "--to", to, "-o", output)


def peft_lora_only(runtime: str, what: str, source: str) -> Rule:
    """The rule of a server that loads PEFT LoRA folders and nothing else (vLLM, TGI, SGLang)."""

    def rule(facts: AdapterFacts) -> list[Finding]:
        if facts.family == "peft" and facts.algorithm in ("LoRA", "DoRA"):
            return []
        return [Finding(
            f"{runtime}.format", BLOCKER, "rejects", f"{what}; this is {facts.label}",
            source=source, fix=lora_fix(facts, "peft", "lora-adapter/"),
        )]  # fmt: skip

    return rule


def dora_undocumented(runtime: str, what: str, source: str) -> Rule:
    """The rule of a server whose docs say nothing of DoRA: flagged as unverified, with the bake."""

    def rule(facts: AdapterFacts) -> list[Finding]:
        if facts.algorithm != "DoRA":
            return []
        return [Finding(
            f"{runtime}.dora", INFO, "unverified", f"{what}. Serve a plain LoRA to be sure",
            facts.of_kind("dora"), source, lora_fix(facts, "peft", "lora-adapter/"),
        )]  # fmt: skip

    return rule


def not_a_diffusion_adapter(rule_id: str, severity: str, effect: str, what: str, source: str) -> Rule:
    """The rule of a diffusion runtime given a language model's adapter: nothing maps."""

    def rule(facts: AdapterFacts) -> list[Finding]:
        if facts.diffusion:
            return []
        return [Finding(rule_id, severity, effect, what, source=source)]

    return rule


def _registry() -> dict[str, Runtime]:
    from loratools.ops.doctor.runtimes import comfyui, diffusers, llama_cpp, peft, sglang, tgi, vllm

    modules = (peft, vllm, llama_cpp, diffusers, comfyui, tgi, sglang)
    return {m.RUNTIME.name: m.RUNTIME for m in modules}


RUNTIMES: dict[str, Runtime] = _registry()


def runtime_names() -> list[str]:
    return list(RUNTIMES)
