"""kohya format: names, alpha folding, exact PEFT round trips, name resolution, refused variants."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import InvalidAdapter, LoratoolsError, MissingKeys, UnknownFormat
from loratools.formats import kohya, peft
from tests.tolerances import TOL

BASE_NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    ),
    "model.norm.weight",
    "lm_head.weight",
]
SHAPES = {
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "up_proj": (64, 32),
    "down_proj": (32, 64),
}


def make_adapter(
    ranks: dict[str, int], alphas: dict[str, float], rslora: bool = False, dtype: torch.dtype = torch.float32
) -> Adapter:
    """Random factors for ``model.layers.N.<part>`` modules with the given ranks and alphas."""
    g = torch.Generator().manual_seed(1)
    weights = {}
    for module, r in ranks.items():
        out, inp = SHAPES[module.rsplit(".", 1)[-1]]
        a = torch.randn(r, inp, generator=g).to(dtype)
        b = torch.randn(out, r, generator=g).to(dtype)
        weights[module] = LoraWeight(a, b, alphas[module], rslora)
    return Adapter(
        weights,
        base_model="org/base",
        task_type="CAUSAL_LM",
        extra_config={"target_modules": ["q_proj", "v_proj", "up_proj"], "lora_dropout": 0.05},
        provenance={"method": "extract", "rank": 4},
    )


MIXED = make_adapter(
    {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 8,
        "model.layers.1.mlp.up_proj": 2,
    },
    {
        "model.layers.0.self_attn.q_proj": 8.0,
        "model.layers.0.self_attn.v_proj": 16.0,
        "model.layers.1.mlp.up_proj": 3.0,
    },
)
RSLORA = make_adapter(
    {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 8},
    {"model.layers.0.self_attn.q_proj": 8.0, "model.layers.1.self_attn.v_proj": 8.0},
    rslora=True,
)


def kohya_delta(tensors: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """The delta a kohya reader computes: alpha / r · up @ down (alpha = r when absent)."""
    down, up = tensors[f"{stem}.lora_down.weight"].float(), tensors[f"{stem}.lora_up.weight"].float()
    r = down.shape[0]
    alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else r
    return alpha / r * up @ down


def without_record(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k != kohya.ADAPTER_METADATA}


@pytest.mark.parametrize("adapter", [MIXED, RSLORA], ids=["mixed", "rslora"])
def test_peft_kohya_peft_is_identical(adapter: Adapter) -> None:
    expected_tensors, _, expected_config = peft.from_adapter(adapter)
    tensors, metadata, _ = kohya.from_adapter(adapter, "lora_unet")
    back = kohya.to_adapter(tensors, metadata)
    got_tensors, got_meta, got_config = peft.from_adapter(back)
    assert got_config == expected_config
    assert got_tensors.keys() == expected_tensors.keys()
    for key, tensor in expected_tensors.items():
        assert torch.equal(got_tensors[key], tensor), key
    assert json.loads(got_meta["loratools"]) == dict(adapter.provenance)


@pytest.mark.parametrize("adapter", [MIXED, RSLORA], ids=["mixed", "rslora"])
def test_kohya_delta_equals_peft_delta_per_module(adapter: Adapter) -> None:
    tensors, _, _ = kohya.from_adapter(adapter, "lora_te1")
    for module in adapter.weights:
        stem = "lora_te1_" + module.replace(".", "_")
        torch.testing.assert_close(kohya_delta(tensors, stem), adapter.delta(module), **TOL[torch.float32])


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 12),
    alpha=st.floats(0.25, 64, allow_nan=False),
    rslora=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_kohya_scale_reproduces_the_delta(rank: int, alpha: float, rslora: bool, dtype: torch.dtype) -> None:
    module = "model.layers.1.self_attn.k_proj"
    adapter = make_adapter({module: rank}, {module: alpha}, rslora, dtype)
    tensors, _, _ = kohya.from_adapter(adapter)
    stem = kohya.kohya_stem(module)
    assert tensors[f"{stem}.lora_down.weight"].dtype == dtype  # factors unchanged
    expected = adapter.delta(module)
    # float32 alpha and a different product order: agreement to float32 rounding of the largest entry
    atol = TOL[torch.float32]["rtol"] * float(expected.abs().max())
    torch.testing.assert_close(
        kohya_delta(tensors, stem), expected, rtol=TOL[torch.float32]["rtol"], atol=atol
    )


def test_keys_shapes_alpha_and_ss_metadata() -> None:
    tensors, metadata, _ = kohya.from_adapter(MIXED, "lora_unet")
    stem = "lora_unet_model_layers_0_self_attn_v_proj"
    assert tensors[f"{stem}.lora_down.weight"].shape == (8, 32)  # (r, in)
    assert tensors[f"{stem}.lora_up.weight"].shape == (16, 8)  # (out, r)
    assert tensors[f"{stem}.alpha"].shape == () and tensors[f"{stem}.alpha"].dtype == torch.float32
    assert float(tensors[f"{stem}.alpha"]) == 16.0
    assert len(tensors) == 3 * len(MIXED.weights)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] in {"2", "4", "8"}
    assert all(isinstance(v, str) for v in metadata.values())


def test_rslora_alpha_is_folded_into_alpha_times_sqrt_r() -> None:
    tensors, metadata, _ = kohya.from_adapter(RSLORA)
    alpha = float(tensors["lora_unet_model_layers_1_self_attn_v_proj.alpha"])
    # alpha stored in float32: ≤ 2⁻²⁴ ≈ 6e-8 relative
    assert alpha == pytest.approx(8.0 * math.sqrt(8), rel=1e-7)
    # without the loratools record the file reads back as plain alpha/r with the same delta
    back = kohya.to_adapter(tensors, without_record(metadata), base_names=BASE_NAMES)
    for module, weight in back.weights.items():
        assert not weight.use_rslora
        torch.testing.assert_close(back.delta(module), RSLORA.delta(module), **TOL[torch.float32])


def test_names_resolve_against_base_when_the_file_has_no_record() -> None:
    tensors, metadata, _ = kohya.from_adapter(MIXED, "lora_unet")
    back = kohya.to_adapter(tensors, without_record(metadata), base_names=BASE_NAMES)
    assert set(back.weights) == set(MIXED.weights)
    for module in MIXED.weights:
        torch.testing.assert_close(back.delta(module), MIXED.delta(module), **TOL[torch.float32])


def test_names_resolve_by_suffix_when_the_base_wraps_differently() -> None:
    tensors = {
        "lora_te_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
        "lora_te_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2),
    }
    back = kohya.to_adapter(tensors, {}, base_names=BASE_NAMES)
    assert list(back.weights) == ["model.layers.0.self_attn.q_proj"]


def test_alpha_absent_means_alpha_equals_rank() -> None:
    tensors = {
        "lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(3, 32),
        "lora_unet_model_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 3),
    }
    weight = kohya.to_adapter(tensors, {}, base_names=BASE_NAMES).weights["model.layers.0.self_attn.q_proj"]
    assert weight.alpha == 3.0 and weight.scale == 1.0


def test_unresolvable_names_are_all_listed() -> None:
    tensors = {}
    for stem in (
        "lora_unet_model_layers_0_self_attn_q_proj",
        "lora_unet_model_layers_7_mlp_fc1",
        "lora_unet_x_y",
    ):
        tensors[f"{stem}.lora_down.weight"] = torch.ones(1, 32)
        tensors[f"{stem}.lora_up.weight"] = torch.ones(32, 1)
    with pytest.raises(MissingKeys) as info:
        kohya.to_adapter(tensors, {}, base_names=BASE_NAMES)
    message = str(info.value)
    assert "lora_unet_model_layers_7_mlp_fc1" in message and "lora_unet_x_y" in message
    assert "lora_unet_model_layers_0_self_attn_q_proj" not in message


def test_without_base_or_record_names_are_refused_not_guessed() -> None:
    tensors, metadata, _ = kohya.from_adapter(MIXED)
    with pytest.raises(MissingKeys, match="--base"):
        kohya.to_adapter(tensors, without_record(metadata))


def test_a_stale_record_is_ignored_in_favour_of_the_tensors() -> None:
    tensors, metadata, _ = kohya.from_adapter(MIXED)
    stem = "lora_unet_model_layers_0_self_attn_q_proj"
    tensors[f"{stem}.alpha"] = torch.tensor(2.0)  # edited by another tool after loratools wrote it
    back = kohya.to_adapter(tensors, metadata)
    assert back.weights["model.layers.0.self_attn.q_proj"].alpha == 2.0
    assert back.weights["model.layers.0.self_attn.v_proj"].alpha == 16.0


@pytest.mark.parametrize(
    ("key", "variant"),
    [
        ("lora_unet_a_b.hada_w1_a", "LoHa"),
        ("lora_unet_a_b.lokr_w1", "LoKr"),
        ("lora_unet_a_b.dora_scale", "DoRA"),
        ("lora_unet_a_b.lora_mid.weight", "mid"),
        ("lora_unet_a_b.diff", "diff"),
    ],
)
def test_other_variants_are_refused_by_name(key: str, variant: str) -> None:
    tensors = {
        "lora_unet_a_b.lora_down.weight": torch.ones(1, 4),
        "lora_unet_a_b.lora_up.weight": torch.ones(4, 1),
        key: torch.ones(4, 4),
    }
    # LoHa, LoKr and LoCon load (formats/lycoris.py), but not mixed into one LoRA module
    with pytest.raises((UnknownFormat, InvalidAdapter), match=variant):
        kohya.to_adapter(tensors, {}, base_names=["a.b.weight"])


def test_conv_lora_loads_on_the_flattened_kernel() -> None:
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(4, 8, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 4, 1, 1),
    }
    weight = kohya.to_adapter(tensors, {}, base_names=["conv_in.weight"]).weights["conv_in"]
    assert weight.shape == (8, 72) and weight.weight_shape == (8, 8, 3, 3)


def test_incomplete_pairs_are_refused() -> None:
    with pytest.raises(UnknownFormat, match="lora_up"):
        kohya.to_adapter({"lora_unet_a_b.lora_down.weight": torch.ones(1, 4)}, {}, base_names=["a.b.weight"])


def test_bad_prefix_and_saved_modules_are_refused() -> None:
    with pytest.raises(LoratoolsError, match="prefix"):
        kohya.from_adapter(MIXED, "unet")
    with pytest.raises(LoratoolsError, match="prefix"):
        kohya.from_adapter(MIXED, "lora_un_et")
    saved = Adapter(MIXED.weights, saved_modules={"lm_head.weight": torch.ones(64, 32)})
    with pytest.raises(LoratoolsError, match="lm_head"):
        kohya.from_adapter(saved)
