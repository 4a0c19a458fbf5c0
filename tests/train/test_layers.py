"""LoRALinear numerics, merge/unmerge, injection (PEFT target semantics), adapter round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loratools.errors import MissingKeys, ShapeMismatch
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.train.inject import (
    inject_lora,
    load_lora_adapter,
    lora_layers,
    lora_parameters,
    matches_target,
    to_adapter,
)
from loratools.train.layers import LoRALinear
from tests.tolerances import F32_WEIGHTS, TOL


def _layer(out: int, inp: int, rank: int, alpha: float, rslora: bool = False, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(inp, out), rank, alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; give the update something to do
    return layer


def test_fresh_layer_computes_the_base_output_exactly() -> None:
    base = nn.Linear(12, 7)
    x = torch.randn(3, 12)
    expected = base(x)
    layer = LoRALinear(base, rank=4, alpha=8)
    assert torch.equal(layer(x), expected)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 24),
    inp=st.integers(1, 24),
    rank=st.integers(1, 9),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
)
def test_forward_is_base_plus_scaled_low_rank_update(
    out: int, inp: int, rank: int, alpha: float, rslora: bool
):
    layer = _layer(out, inp, rank, alpha, rslora)
    x = torch.randn(5, inp)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    expected = layer.base(x) + scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)  # float32, another order of sums
    assert layer.scale == pytest.approx(scale)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), inp=st.integers(1, 24), rank=st.integers(1, 9), alpha=st.floats(0.5, 64))
def test_merge_preserves_outputs_and_unmerge_restores_weights(out: int, inp: int, rank: int, alpha: float):
    layer = _layer(out, inp, rank, alpha)
    x = torch.randn(4, inp)
    before, weight = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    # merged W·x vs W0·x + s·B·A·x: float32 in another order, outputs of size ~√in
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.base.weight, weight + layer.delta(), **TOL[torch.float32])
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, **F32_WEIGHTS)  # W0 + ΔW − ΔW in float32
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)  # as after merge()


def test_merge_twice_is_a_no_op() -> None:
    layer = _layer(6, 5, 2, 4)
    layer.merge()
    merged = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, merged)


def test_inits_follow_peft() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4096, 8), rank=16, alpha=16)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=√5) on fan_in = in_features
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    gaussian = LoRALinear(nn.Linear(4096, 8), rank=16, alpha=16, init="gaussian")
    # the std of 16·4096 draws is off by ~1/√(2·65 536) ≈ 0.3%; 5% still tells 1/16 from other inits
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)
    with pytest.raises(ValueError, match="init"):
        LoRALinear(nn.Linear(4, 4), rank=2, alpha=2, init="zeros")


def test_dropout_only_touches_the_lora_branch() -> None:
    layer = _layer(6, 8, 2, 4)
    layer.dropout = nn.Dropout(1.0 - 1e-7)  # drops (almost) everything in training mode
    x = torch.randn(3, 8)
    layer.train()
    torch.testing.assert_close(layer(x), layer.base(x))
    layer.eval()
    assert not torch.allclose(layer(x), layer.base(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.gate_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block.q_proj(block.norm(x)) + block.gate_proj(x)[..., :8] + block.v_proj(x).repeat(1, 2)
        return self.head(x)


@pytest.mark.parametrize(
    ("name", "targets", "expected"),
    [
        ("layers.0.q_proj", ["q_proj"], True),
        ("layers.0.q_proj", ["0.q_proj"], True),
        ("layers.0.q_proj", ["proj"], False),  # a suffix must start at a dot
        ("layers.0.q_proj", ["layers.0.q_proj"], True),
        ("layers.0.q_proj", r".*\.(q|v)_proj", True),
        ("layers.0.q_proj", r"q_proj", False),  # a regex must match the whole name
        ("layers.1.v_proj", r"layers\.0\..*", False),
    ],
)
def test_target_matching_follows_peft(name: str, targets: list[str] | str, expected: bool) -> None:
    assert matches_target(name, targets) is expected


def test_inject_wraps_targets_and_freezes_everything_else() -> None:
    net = _Net()
    chosen = inject_lora(net, ["q_proj", "v_proj"], rank=2, alpha=4)
    assert chosen == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert set(lora_layers(net)) == set(chosen)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(net)}
    assert len(trainable) == 8


def test_inject_by_regex_and_rank_pattern() -> None:
    net = _Net()
    chosen = inject_lora(net, r"layers\.1\..*_proj", rank=2, alpha=4, rank_pattern={"layers.1.gate_proj": 5})
    assert chosen == ["layers.1.q_proj", "layers.1.v_proj", "layers.1.gate_proj"]
    assert lora_layers(net)["layers.1.gate_proj"].rank == 5


def test_inject_reports_the_available_layers_when_nothing_matches() -> None:
    with pytest.raises(MissingKeys, match=r"gate_proj, head, q_proj, v_proj"):
        inject_lora(_Net(), ["qkv"], rank=2, alpha=4)


def test_adapter_round_trip_reproduces_outputs(tmp_path) -> None:
    net = _Net()
    inject_lora(net, ["q_proj", "gate_proj"], rank=3, alpha=6, use_rslora=True)
    for layer in lora_layers(net).values():
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8)
    expected = net(x)
    adapter = to_adapter(
        net, base_model="tiny", targets=["q_proj", "gate_proj"], provenance={"method": "train"}
    )
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert loaded.provenance == {"method": "train"} and loaded.base_model == "tiny"
    fresh = _Net()
    fresh.load_state_dict(
        {k.replace(".base.", "."): v for k, v in net.state_dict().items() if "lora_" not in k}
    )
    names = load_lora_adapter(fresh, loaded)
    assert sorted(names) == sorted(lora_layers(net))
    torch.testing.assert_close(fresh(x), expected, **TOL[torch.float32])


def test_load_adapter_accepts_a_different_rank_and_checks_shapes() -> None:
    source = _Net()
    inject_lora(source, ["v_proj"], rank=7, alpha=7)
    adapter = to_adapter(source)
    target = _Net()
    load_lora_adapter(target, adapter)
    assert {layer.rank for layer in lora_layers(target).values()} == {7}
    wrong = adapter.with_weights({"layers.0.q_proj": adapter.weights["layers.0.v_proj"]})
    with pytest.raises(ShapeMismatch, match="layers.0.q_proj"):
        load_lora_adapter(_Net(), wrong)
    missing = adapter.with_weights({"layers.0.k_proj": adapter.weights["layers.0.v_proj"]})
    with pytest.raises(MissingKeys, match="k_proj"):
        load_lora_adapter(_Net(), missing)
