"""The one file-kind detector: every family and algorithm it names, and what it refuses."""

from __future__ import annotations

import json

import pytest

from loratools.errors import UnknownFormat
from loratools.formats import detect
from loratools.formats.detect import adapter_kind, checkpoint_kind, gguf_kind

M = "base_model.model.model.layers.0.self_attn.q_proj"
# kinds whose loaders are being added (issues 14–15): supported once they register
IN_PROGRESS = {"LoHa", "LoKr", "LoCon"}


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry, so that registering in a test does not leak into others."""
    monkeypatch.setattr(detect, "SUPPORTED", set(detect.SUPPORTED))


K = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.mark.parametrize(
    ("keys", "config", "algorithm", "label"),
    [
        ([f"{M}.lora_A.weight", f"{M}.lora_B.weight"], {"peft_type": "LORA"}, "LoRA", "a PEFT LoRA adapter"),
        ([f"{M}.lora_A.weight"], {"peft_type": "LORA", "use_dora": True}, "DoRA", "a PEFT DoRA adapter"),
        ([f"{M}.lora_A.weight", f"{M}.lora_magnitude_vector"], {}, "DoRA", "a PEFT DoRA adapter"),
        ([f"{M}.hada_w1_a"], {"peft_type": "LOHA"}, "LoHa", "a PEFT LoHa adapter"),
        ([f"{M}.lokr_w1"], {"peft_type": "LOKR"}, "LoKr", "a PEFT LoKr adapter"),
        ([f"{M}.ia3_l"], {"peft_type": "IA3"}, "IA3", "a PEFT IA³ adapter"),
        ([f"{M}.vera_lambda_b"], {"peft_type": "VERA"}, "other", "a PEFT VERA adapter"),
    ],
)
def test_peft_kinds_come_from_the_config_and_keys(keys, config, algorithm, label) -> None:
    kind = adapter_kind(keys, config=config)
    assert (kind.kind, kind.family, kind.algorithm, kind.label) == ("adapter", "peft", algorithm, label)
    assert kind.supported == (algorithm in ("LoRA", "DoRA")) or algorithm in IN_PROGRESS


def kohya_keys(*parts: str) -> list[str]:
    return [f"{K}.{p}" for p in parts] + [f"{K}.alpha"]


@pytest.mark.parametrize(
    ("keys", "shapes", "metadata", "algorithm"),
    [
        (kohya_keys("lora_down.weight", "lora_up.weight"), {}, {}, "LoRA"),
        (kohya_keys("lora_down.weight", "lora_up.weight", "dora_scale"), {}, {}, "DoRA"),
        (kohya_keys("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), {}, {}, "LoHa"),
        (kohya_keys("lokr_w1", "lokr_w2"), {}, {}, "LoKr"),
        (kohya_keys("lokr_w1", "lokr_w2_a", "lokr_w2_b"), {}, {}, "LoKr"),
        (kohya_keys("lora_down.weight", "lora_up.weight", "lora_mid.weight"), {}, {}, "LoCon"),
        (
            kohya_keys("lora_down.weight", "lora_up.weight"),
            {f"{K}.lora_down.weight": (4, 8, 3, 3)},
            {},
            "LoCon",
        ),
        (
            kohya_keys("lora_down.weight", "lora_up.weight"),
            {},
            {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon"})},
            "LoCon",
        ),
        (kohya_keys("oft_blocks"), {}, {}, "OFT"),
        (kohya_keys("a1.weight", "a2.weight", "b1.weight", "b2.weight"), {}, {}, "GLoRA"),
        (kohya_keys("diff"), {}, {}, "full/diff"),
        (kohya_keys("on_input", "weight"), {}, {}, "IA3"),
    ],
)
def test_kohya_and_lycoris_kinds_come_from_the_keys(keys, shapes, metadata, algorithm) -> None:
    kind = adapter_kind(keys, shapes=shapes, metadata=metadata)
    assert (kind.family, kind.algorithm) == ("kohya", algorithm)
    assert kind.supported == (algorithm in ("LoRA", "DoRA")) or algorithm in IN_PROGRESS


def test_unknown_lycoris_parts_are_named_by_the_training_record() -> None:
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "boft"})}
    keys = [f"{K}.boft_new_part", f"{K}.alpha"]
    assert detect.looks_like_adapter(keys, metadata) and not detect.looks_like_adapter(keys)
    assert adapter_kind(keys, metadata=metadata).label == "a kohya BOFT adapter"
    with pytest.raises(UnknownFormat, match="no LoRA tensors"):
        adapter_kind(keys)


def test_labels_read_as_a_sentence() -> None:
    lokr = adapter_kind(kohya_keys("lokr_w1", "lokr_w2"))
    assert lokr.label == "a kohya LoKr adapter"
    assert (
        str(lokr.refuse("x.safetensors"))
        == "x.safetensors: a kohya LoKr adapter: not supported by loratools yet"
    )
    assert adapter_kind(kohya_keys("diff")).label == "a kohya full-weight difference (diff) adapter"


def test_cloneofsimo_safeloras_keys() -> None:
    kind = adapter_kind(["unet:0:up", "unet:0:down", "text_encoder:0:up", "text_encoder:0:down"])
    assert (kind.family, kind.algorithm, kind.label) == (
        "cloneofsimo",
        "LoRA",
        "a cloneofsimo lora LoRA adapter",
    )
    assert not kind.supported


def test_gguf_adapter_and_model() -> None:
    adapter = gguf_kind(
        {"general.type": "adapter", "adapter.type": "lora", "general.architecture": "llama"}, []
    )
    assert (adapter.kind, adapter.family, adapter.algorithm) == ("adapter", "gguf", "LoRA")
    assert adapter.label == "a GGUF LoRA adapter (llama)"
    model = gguf_kind({"general.architecture": "llama"}, ["Q4_1", "Q4_1", "Q6_K"])
    assert (model.kind, model.label) == ("checkpoint", "a GGUF model (llama, Q4_1)")


def test_checkpoint_labels() -> None:
    assert checkpoint_kind("safetensors-sharded", 3).label == "a sharded safetensors checkpoint (3 shards)"
    assert checkpoint_kind("safetensors").label == "a safetensors checkpoint"
    assert checkpoint_kind("pytorch").label == "a PyTorch checkpoint"


def test_mixed_or_empty_names_are_refused_with_the_reason() -> None:
    with pytest.raises(UnknownFormat, match="both PEFT"):
        adapter_kind([f"{M}.lora_A.weight", f"{K}.lora_down.weight"])
    with pytest.raises(UnknownFormat, match="no LoRA tensors"):
        adapter_kind(["model.embed_tokens.weight"])


def test_a_loader_registers_its_kind() -> None:
    oft = adapter_kind(kohya_keys("oft_blocks"))
    assert not oft.supported
    detect.register("kohya", "OFT")
    assert oft.supported


def test_kohya_stems_are_told_from_module_paths() -> None:
    assert detect.is_kohya_stem("lora_unet_down_blocks_0_proj_in")
    assert not detect.is_kohya_stem("model.layers.0.self_attn.q_proj")
    assert not detect.is_kohya_stem("lm_head")
