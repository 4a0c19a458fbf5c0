"""The PEFT format, judged by the real PEFT library: what we write PEFT loads, what PEFT writes we read."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import UnknownFormat
from loratools.formats import LoadContext, peft
from loratools.io.adapter_dir import load_adapter, save_adapter
from tests.peft_helpers import logits_through_peft, logits_with_merged_by_hand, tokens
from tests.tolerances import LOGITS_FP32


def random_weight(
    out_f: int, in_f: int, rank: int, alpha: float, rslora: bool = False, seed: int = 0
) -> LoraWeight:
    gen = torch.Generator().manual_seed(seed)
    return LoraWeight(
        torch.randn(rank, in_f, generator=gen) * 0.1,
        torch.randn(out_f, rank, generator=gen) * 0.1,
        alpha,
        rslora,
    )


def mixed_adapter(rslora: bool = False) -> Adapter:
    """Different ranks and alphas per module, on q/v of layer 0 and o/down of layer 1."""
    weights = {
        "model.layers.0.self_attn.q_proj": random_weight(32, 32, 4, 8.0, rslora, 1),
        "model.layers.0.self_attn.v_proj": random_weight(16, 32, 2, 8.0, rslora, 2),
        "model.layers.1.self_attn.o_proj": random_weight(32, 32, 4, 3.0, rslora, 3),
        "model.layers.1.mlp.down_proj": random_weight(32, 64, 8, 16.0, rslora, 4),
    }
    return Adapter(weights, base_model="fixtures/base", task_type="CAUSAL_LM")


def test_round_trip_through_a_folder_is_exact(tmp_path: Path) -> None:
    adapter = mixed_adapter()
    save_adapter(adapter, tmp_path / "a")
    back = load_adapter(tmp_path / "a")
    assert sorted(back.modules) == sorted(adapter.modules)
    for name, w in adapter.weights.items():
        assert torch.equal(back.weights[name].a, w.a) and torch.equal(back.weights[name].b, w.b)
        # float64 arithmetic on the same alpha and r
        assert back.weights[name].scale == pytest.approx(w.scale, rel=1e-12)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {
        "model.layers.0.self_attn.v_proj": 2,
        "model.layers.1.mlp.down_proj": 8,
    }
    assert config["alpha_pattern"] == {
        "model.layers.1.self_attn.o_proj": 3,
        "model.layers.1.mlp.down_proj": 16,
    }


def test_mixed_rslora_is_folded_into_alpha() -> None:
    weights = {
        "x.q_proj": random_weight(8, 8, 4, 8.0, True, 1),
        "x.v_proj": random_weight(8, 8, 4, 8.0, False, 2),
    }
    tensors, _, config = peft.from_adapter(Adapter(weights))
    assert config["use_rslora"] is False
    back = peft.to_adapter(tensors, context=LoadContext(config=config))
    for name, w in weights.items():
        assert back.weights[name].scale == pytest.approx(w.scale)
    assert back.weights["x.q_proj"].alpha == pytest.approx(8.0 * math.sqrt(4))


def test_unsupported_variants_are_refused() -> None:
    a, b = torch.zeros(2, 4), torch.zeros(4, 2)
    keys = {"base_model.model.m.lora_A.weight": a, "base_model.model.m.lora_B.weight": b}
    with pytest.raises(UnknownFormat, match="use_dora"):  # DoRA itself loads: tests/ops/test_dora.py
        peft.to_adapter(keys, context=LoadContext(config={"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(UnknownFormat, match="IA3"):
        peft.to_adapter(keys, context=LoadContext(config={"peft_type": "IA3"}))
    with pytest.raises(UnknownFormat, match="only lora_A"):
        peft.to_adapter(
            {"base_model.model.m.lora_A.weight": a}, context=LoadContext(config={"peft_type": "LORA"})
        )


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_and_matches_the_hand_merged_model(
    tmp_path: Path, fixtures_dir: Path, rslora: bool
) -> None:
    adapter = mixed_adapter(rslora)
    save_adapter(adapter, tmp_path / "ours")
    ids = tokens()
    expected = logits_with_merged_by_hand(fixtures_dir / "base", adapter, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits_through_peft(fixtures_dir / "base", tmp_path / "ours", ids)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # no module wrapped in vain
    torch.testing.assert_close(got, expected, **LOGITS_FP32)
    base_only = logits_with_merged_by_hand(fixtures_dir / "base", Adapter({}), ids)
    assert (got - base_only).abs().max() > 1e-3  # the adapter really changes the output


@pytest.mark.slow
def test_fixture_adapter_loads_in_peft(fixtures_dir: Path) -> None:
    adapter = load_adapter(fixtures_dir / "adapter")
    ids = tokens()
    torch.testing.assert_close(
        logits_through_peft(fixtures_dir / "base", fixtures_dir / "adapter", ids),
        logits_with_merged_by_hand(fixtures_dir / "base", adapter, ids),
        **LOGITS_FP32,
    )


@pytest.mark.slow
def test_we_read_what_peft_writes_exactly(tmp_path: Path, fixtures_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from tests.peft_helpers import load_llama

    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 5},
        use_rslora=True,
        init_lora_weights="gaussian",
    )
    model = get_peft_model(load_llama(fixtures_dir / "base"), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tmp_path / "peft")
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(ours.weights) == 6
    for module, w in ours.weights.items():
        assert torch.equal(w.a, stored[f"base_model.model.{module}.lora_A.weight"])
        assert torch.equal(w.b, stored[f"base_model.model.{module}.lora_B.weight"])
        layer = model.base_model.model.get_submodule(module)
        # float64 arithmetic on the same alpha and r
        assert w.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
    assert ours.weights["model.layers.0.mlp.down_proj"].rank == 2
    assert ours.weights["model.layers.1.self_attn.v_proj"].alpha == 5
