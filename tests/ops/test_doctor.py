"""Every doctor rule: a case that triggers it and one that does not (pure facts, no files)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError
from loratools.ops.doctor import AdapterFacts, BaseFacts, adapter_facts, diagnose, parse_runtimes
from loratools.ops.doctor.general import general_findings
from loratools.ops.doctor.runtimes import RUNTIMES

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def clean(**changes: object) -> AdapterFacts:
    """A PEFT LoRA that every LLM runtime loads: rank 8, alpha 16, 64×64 modules, one alpha."""
    facts = AdapterFacts(
        path="adapter/",
        label="a PEFT LoRA adapter",
        family="peft",
        algorithm="LoRA",
        kinds=dict.fromkeys(MODULES, "lora"),
        ranks=dict.fromkeys(MODULES, 8),
        shapes=dict.fromkeys(MODULES, (64, 64)),
        scales=dict.fromkeys(MODULES, 2.0),
    )
    return replace(facts, **changes)  # type: ignore[arg-type]


def rules(facts: AdapterFacts, runtime: str) -> set[str]:
    found = general_findings(facts) if runtime == "general" else RUNTIMES[runtime].check(facts).findings
    return {f.rule for f in found}


DIFFUSION = {"diffusion": True, "family": "kohya", "label": "a kohya LoRA adapter"}
CASES = [
    # (runtime, rule, facts that trigger it, facts that do not)
    ("general", "general.unreadable", {"load_error": "alpha is NaN"}, {}),
    ("general", "general.zero_update", {"zero_modules": MODULES[:1]}, {}),
    ("general", "general.duplicate_modules", {"duplicates": MODULES}, {}),
    ("general", "general.rank_exceeds_dims", {"ranks": dict.fromkeys(MODULES, 64)}, {"ranks": dict.fromkeys(MODULES, 63)}),
    ("general", "general.extreme_scale", {"scales": dict.fromkeys(MODULES, 128.0)}, {"scales": dict.fromkeys(MODULES, 64.0)}),
    ("general", "general.tiny_scale", {"scales": dict.fromkeys(MODULES, 1e-4)}, {"scales": dict.fromkeys(MODULES, 1e-2)}),
    ("general", "general.base_missing_modules", {"base": BaseFacts("b/", missing=MODULES[:1])}, {"base": BaseFacts("b/")}),
    ("general", "general.base_shape_mismatch", {"base": BaseFacts("b/", mismatched=("q: (64, 64) vs (32, 64)",))}, {"base": BaseFacts("b/")}),
    ("general", "general.merge_precision", {"base": BaseFacts("b/", dtype="bfloat16", lost={MODULES[0]: 0.9})}, {"base": BaseFacts("b/", dtype="bfloat16", lost={MODULES[0]: 0.1})}),
    ("peft", "peft.format", {"family": "kohya", "label": "a kohya LoRA adapter"}, {}),
    ("peft", "peft.recorded_base", {"base": BaseFacts("my/base", recorded="org/other-model")}, {"base": BaseFacts("models/other-model", recorded="org/other-model")}),
    ("vllm", "vllm.format", {"algorithm": "LoHa", "label": "a PEFT LoHa adapter"}, {}),
    ("vllm", "vllm.dora", {"algorithm": "DoRA", "kinds": dict.fromkeys(MODULES, "dora")}, {}),
    ("vllm", "vllm.modules_to_save", {"saved_modules": ("lm_head.weight",)}, {}),
    ("vllm", "vllm.max_lora_rank", {"ranks": dict.fromkeys(MODULES, 17)}, {"ranks": dict.fromkeys(MODULES, 16)}),
    ("llama.cpp", "llama.cpp.format", {}, {"family": "gguf", "label": "a GGUF LoRA adapter"}),
    ("llama.cpp", "llama.cpp.dora", {"algorithm": "DoRA", "kinds": dict.fromkeys(MODULES, "dora")}, {}),
    ("llama.cpp", "llama.cpp.lycoris", {"algorithm": "LoKr"}, {}),
    ("llama.cpp", "llama.cpp.rslora", {"rslora": MODULES}, {"rslora": MODULES, "family": "gguf"}),
    ("llama.cpp", "llama.cpp.alpha_pattern", {"scales": {MODULES[0]: 2.0, MODULES[1]: 4.0}}, {"ranks": {MODULES[0]: 8, MODULES[1]: 4}, "scales": {MODULES[0]: 2.0, MODULES[1]: 4.0}}),
    ("llama.cpp", "llama.cpp.modules_to_save", {"saved_modules": ("model.embed_tokens.weight",)}, {}),
    ("llama.cpp", "llama.cpp.tied_lm_head", {"kinds": {"lm_head": "lora"}, "base": BaseFacts("b/", tied_embeddings=True)}, {"kinds": {"lm_head": "lora"}, "base": BaseFacts("b/")}),
    ("diffusers", "diffusers.not_a_pipeline_adapter", {}, DIFFUSION),
    ("diffusers", "diffusers.lycoris", {**DIFFUSION, "algorithm": "LoHa", "label": "a kohya LoHa adapter"}, DIFFUSION),
    ("comfyui", "comfyui.unmatched_keys", {}, DIFFUSION),
    ("comfyui", "comfyui.algorithm", {**DIFFUSION, "algorithm": "IA3"}, {**DIFFUSION, "algorithm": "LoKr"}),
    ("tgi", "tgi.format", {"family": "kohya"}, {}),
    ("tgi", "tgi.dora", {"algorithm": "DoRA"}, {}),
    ("sglang", "sglang.format", {"algorithm": "LoKr"}, {}),
    ("sglang", "sglang.dora", {"algorithm": "DoRA"}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("runtime", "rule", "trigger", "quiet"), CASES, ids=[c[1] for c in CASES])
def test_each_rule_fires_on_its_case_and_not_on_its_near_miss(runtime, rule, trigger, quiet) -> None:
    assert rule in rules(clean(**trigger), runtime)
    assert rule not in rules(clean(**quiet), runtime)


def test_every_rule_has_a_case_and_a_source() -> None:
    tested = {c[1] for c in CASES}
    everything = [clean(**c[2]) for c in CASES]
    found = {
        f
        for facts in everything
        for runtime in (*RUNTIMES, "general")
        for f in (
            general_findings(facts) if runtime == "general" else RUNTIMES[runtime].check(facts).findings
        )
    }
    assert {f.rule for f in found} <= tested  # no rule fires that the table does not name
    assert all(f.source for f in found)
    assert all(f.severity in ("blocker", "change", "info") for f in found)


def test_verdicts_and_exit_code_follow_the_worst_finding() -> None:
    fine = diagnose(clean(), ["peft", "vllm"])
    assert [r.verdict for r in fine.runtimes] == ["loads", "loads"] and fine.exit_code == 0
    rank = diagnose(clean(ranks=dict.fromkeys(MODULES, 32)), ["vllm", "llama.cpp"])
    assert [r.verdict for r in rank.runtimes] == ["will not load", "loads with changes"]
    assert rank.exit_code == 1
    assert diagnose(clean(ranks=dict.fromkeys(MODULES, 32)), ["llama.cpp"]).exit_code == 0


def test_default_runtimes_follow_the_adapter_kind() -> None:
    llm = diagnose(clean())
    assert {r.runtime for r in llm.runtimes} == {"peft", "vllm", "llama.cpp", "tgi", "sglang"}
    assert set(llm.not_checked) == {"diffusers", "comfyui"}
    sd = diagnose(clean(**DIFFUSION))
    assert {r.runtime for r in sd.runtimes} == {"peft", "diffusers", "comfyui"}


def test_fix_commands_name_the_adapter_and_the_base() -> None:
    dora = clean(algorithm="DoRA", path="my adapter", base=BaseFacts("base/"))
    (finding,) = [f for f in RUNTIMES["vllm"].check(dora).findings if f.rule == "vllm.dora"]
    assert finding.fix == "loratools convert 'my adapter' --to peft -r 8 --base base/ -o lora-adapter/"
    (rank,) = RUNTIMES["vllm"].check(clean(ranks=dict.fromkeys(MODULES, 40))).findings
    assert rank.fix == "loratools resize adapter/ -r 16 -o resized/"
    assert "--max-lora-rank 64" in rank.message


def test_facts_from_a_loaded_adapter() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = {
        "a.q_proj": LoraWeight(torch.randn(4, 16, generator=gen), torch.randn(32, 4, generator=gen), 8.0),
        "a.v_proj": LoraWeight(torch.randn(4, 16, generator=gen), torch.zeros(32, 4), 8.0, use_rslora=True),
    }
    facts = adapter_facts("x", "a PEFT LoRA adapter", "peft", "LoRA", Adapter(weights))
    assert facts.zero_modules == ("a.v_proj",)
    assert facts.rslora == ("a.v_proj",)
    assert facts.ranks == {"a.q_proj": 4, "a.v_proj": 4}
    assert facts.scales["a.q_proj"] == pytest.approx(2.0) and facts.scales["a.v_proj"] == pytest.approx(4.0)
    assert not facts.diffusion
    unloaded = adapter_facts(
        "x", "a kohya LoHa adapter", "kohya", "LoHa", None, names=["lora_unet_a.hada_w1_a"]
    )
    assert unloaded.diffusion


def test_unknown_runtime_is_an_error() -> None:
    with pytest.raises(LoratoolsError, match="unknown runtime"):
        parse_runtimes("vllm,onnx")
    assert parse_runtimes("all") is None
    assert parse_runtimes("VLLM, peft") == ["vllm", "peft"]
