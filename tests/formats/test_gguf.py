"""llama.cpp names, the q/k permutation and the scale folding (pure; the gguf package only as a reference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import UnknownFormat
from loratools.formats import gguf as names
from tests.tolerances import TOL

HF_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    *(
        f"model.layers.{i}.{m}.weight"
        for i in (0, 11)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "post_attention_layernorm",
        )
    ),
    "model.layers.3.self_attn.q_proj.bias",
    "model.norm.weight",
    "lm_head.weight",
]
LLAMA = names.ARCHITECTURES["llama"]
N_HEAD, N_KV = 4, 2  # the fixture model: hidden 32, head_dim 8


def test_names_agree_with_the_gguf_package_table() -> None:
    gguf = pytest.importorskip("gguf")
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 12)
    for name in HF_NAMES:
        expected = table.get_name(name, try_suffixes=(".weight", ".bias"))
        assert names.gguf_name(name) == expected, name


@pytest.mark.parametrize("name", HF_NAMES)
def test_gguf_names_map_back(name: str) -> None:
    assert names.hf_name(str(names.gguf_name(name))) == name


def test_module_names_map_without_suffix_and_unknowns_give_none() -> None:
    assert names.gguf_name("model.layers.2.self_attn.o_proj") == "blk.2.attn_output"
    assert names.gguf_name("lm_head") == "output"
    assert names.gguf_name("model.layers.2.mlp.fc1") is None
    assert names.gguf_name("vision_tower.patch_embed.weight") is None
    assert names.hf_name("blk.0.ffn_gate_exps.weight") is None


def reference_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Row by row: GGUF row h·hd + 2i is HF row h·hd + i, row h·hd + 2i + 1 is HF row h·hd + hd/2 + i."""
    hd = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


@settings(max_examples=30, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 5), cols=st.integers(1, 4))
def test_permutation_is_llama_cpp_pairing_and_inverts(n_head: int, half: int, cols: int) -> None:
    w = torch.randn(n_head * 2 * half, cols, dtype=torch.float64)
    permuted = names.permute_qk(w, n_head)
    assert torch.equal(permuted, reference_permute(w, n_head))
    assert torch.equal(names.unpermute_qk(permuted, n_head), w)
    bias = torch.randn(n_head * 2 * half)
    assert torch.equal(names.unpermute_qk(names.permute_qk(bias, n_head), n_head), bias)


@pytest.mark.slow  # imports transformers (~5 s)
def test_unpermute_agrees_with_transformers_gguf_loader() -> None:
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    for name, rows, heads in (("blk.0.attn_q.weight", 64, 8), ("blk.0.attn_k.weight", 16, 2)):
        w = torch.randn(rows, 12)
        theirs = processor.process(w.numpy().copy(), name).weights
        assert torch.equal(torch.from_numpy(theirs), names.unpermute_qk(w, heads)), name


def make_adapter(ranks: dict[str, int], alphas: dict[str, float], rslora: bool) -> Adapter:
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "down_proj": (32, 64)}
    g = torch.Generator().manual_seed(3)
    weights = {}
    for module, r in ranks.items():
        out, inp = shapes[module.rsplit(".", 1)[-1]]
        weights[module] = LoraWeight(
            torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alphas[module], rslora
        )
    return Adapter(weights)


def assert_close_f32(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 agreement, absolute error measured against the largest entry (products reorder sums)."""
    rtol = TOL[torch.float32]["rtol"]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def llama_cpp_delta(tensors: dict[str, torch.Tensor], name: str, alpha: float) -> torch.Tensor:
    """What llama.cpp adds to ``name``'s output: alpha / r · B @ A, r = B's columns."""
    a, b = tensors[f"{name}.lora_a"].float(), tensors[f"{name}.lora_b"].float()
    return alpha / b.shape[1] * b @ a


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_folded_scale_gives_the_peft_delta_for_mixed_ranks(rslora: bool) -> None:
    modules = {
        "model.layers.0.self_attn.q_proj": (4, 8.0),
        "model.layers.0.self_attn.k_proj": (8, 8.0),
        "model.layers.1.self_attn.v_proj": (2, 5.0),
        "model.layers.1.mlp.down_proj": (6, 16.0),
    }
    adapter = make_adapter(
        {m: r for m, (r, _) in modules.items()}, {m: a for m, (_, a) in modules.items()}, rslora
    )
    base_of = {m: f"{m}.weight" for m in modules}
    alpha, tensors = names.adapter_tensors(adapter, base_of, LLAMA, N_HEAD, N_KV)
    assert len(tensors) == 2 * len(modules)
    for module, weight in adapter.weights.items():
        name = str(names.gguf_name(f"{module}.weight"))
        assert tensors[f"{name}.lora_a"].shape == (weight.rank, weight.in_features)
        assert tensors[f"{name}.lora_b"].shape == (weight.out_features, weight.rank)
        delta = llama_cpp_delta(tensors, name, alpha)
        heads = names.qk_heads(name, N_HEAD, N_KV)
        if heads is not None:  # llama.cpp's base rows are permuted; undo to compare with HF's layout
            delta = names.unpermute_qk(delta, heads)
        assert_close_f32(delta, adapter.delta(module))


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    alphas=st.lists(st.floats(0.5, 64), min_size=3, max_size=3),
    rslora=st.booleans(),
)
def test_folding_holds_for_any_ranks_and_alphas(ranks: list[int], alphas: list[float], rslora: bool) -> None:
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
    ]
    adapter = make_adapter(
        dict(zip(modules, ranks, strict=True)), dict(zip(modules, alphas, strict=True)), rslora
    )
    alpha, tensors = names.adapter_tensors(adapter, {m: f"{m}.weight" for m in modules}, LLAMA, N_HEAD, N_KV)
    assert alpha == float(torch.tensor(alpha, dtype=torch.float32))  # what the file can hold
    for module in modules:
        name = str(names.gguf_name(f"{module}.weight"))
        delta = llama_cpp_delta(tensors, name, alpha)
        heads = names.qk_heads(name, N_HEAD, N_KV)
        assert_close_f32(names.unpermute_qk(delta, heads) if heads else delta, adapter.delta(module))


def test_uniform_plain_adapter_keeps_its_alpha_and_factors_bit_for_bit() -> None:
    module = "model.layers.0.self_attn.v_proj"
    adapter = make_adapter({module: 4}, {module: 8.0}, rslora=False)
    alpha, tensors = names.adapter_tensors(adapter, {module: f"{module}.weight"}, LLAMA, N_HEAD, N_KV)
    assert alpha == 8.0
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_b"], adapter.weights[module].b)
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_a"], adapter.weights[module].a)


def test_qwen2_does_not_permute() -> None:
    module = "model.layers.0.self_attn.q_proj"
    adapter = make_adapter({module: 4}, {module: 4.0}, rslora=False)
    qwen = names.ARCHITECTURES["qwen2"]
    _, tensors = names.adapter_tensors(adapter, {module: f"{module}.weight"}, qwen, N_HEAD, N_KV)
    assert torch.equal(tensors["blk.0.attn_q.weight.lora_b"], adapter.weights[module].b)


def test_unmappable_modules_are_refused_by_name() -> None:
    adapter = make_adapter(
        {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.down_proj": 2},
        {"model.layers.0.self_attn.q_proj": 2.0, "model.layers.0.mlp.down_proj": 2.0},
        rslora=False,
    )
    base_of = {
        "model.layers.0.self_attn.q_proj": "encoder.q.weight",
        "model.layers.0.mlp.down_proj": "x.fc.weight",
    }
    with pytest.raises(UnknownFormat) as info:
        names.adapter_tensors(adapter, base_of, LLAMA, N_HEAD, N_KV)
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "model.layers.0.mlp.down_proj" in str(
        info.value
    )


def test_dtype_is_applied_after_folding() -> None:
    module = "model.layers.0.self_attn.v_proj"
    adapter = make_adapter({module: 4}, {module: 3.0}, rslora=True)
    _, tensors = names.adapter_tensors(
        adapter, {module: f"{module}.weight"}, LLAMA, N_HEAD, N_KV, torch.float16
    )
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    # one alpha/r · B'A with alpha = 3·√4 = 6 (the plain alpha of the only module)
    delta = llama_cpp_delta(tensors, "blk.0.attn_v.weight", 3.0 * math.sqrt(4))
    # float16 factors: each rounded by ≤ 2⁻¹¹, so B·A by ≲ 2·2⁻¹¹ ≈ 1e-3 of its terms; 4e-3 for r = 4 sums
    torch.testing.assert_close(delta, adapter.delta(module), rtol=4e-3, atol=4e-3 * float(delta.abs().max()))


def test_hf_config_from_llama_metadata() -> None:
    kv = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 128,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 8,
        "tokenizer.ggml.tokens": ["a"] * 64,
        "tokenizer.ggml.bos_token_id": 1,
    }
    config = names.hf_config(kv, has_output=False)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 32, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert (
        config["vocab_size"] == 64 and config["bos_token_id"] == 1 and config["tie_word_embeddings"] is True
    )
    with pytest.raises(UnknownFormat, match="falcon"):
        names.hf_config({"general.architecture": "falcon"}, has_output=True)
