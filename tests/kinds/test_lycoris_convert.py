"""LoHa/LoKr → plain LoRA: each module at the Eckart–Young optimum of its exact ΔW; convs stay convs."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.formats import lycoris
from loratools.kinds.loha import LohaWeight
from loratools.kinds.lokr import LokrWeight
from loratools.ops.resize import ResizeOptions, lycoris_to_lora


def _adapter() -> Adapter:
    g = torch.Generator().manual_seed(11)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return Adapter(
        weights={
            "loha": LohaWeight(rand(40, 3), rand(3, 30), rand(40, 3), rand(3, 30), alpha=1.5),
            "lokr": LokrWeight(rand(4, 5), None, None, None, rand(10, 3), rand(3, 6), alpha=2.0, scale=2 / 3),
            "lokr_conv": LokrWeight(
                rand(2, 2),
                None,
                None,
                rand(4, 3, 3, 3),
                None,
                None,
                alpha=1.0,
                scale=1.0,
                weight_shape=(8, 6, 3, 3),
            ),
            "loha_conv": LohaWeight(
                rand(2, 6),
                rand(2, 4),
                rand(2, 6),
                rand(2, 4),
                alpha=2.0,
                t1=rand(2, 2, 3, 3),
                t2=rand(2, 2, 3, 3),
                weight_shape=(6, 4, 3, 3),
            ),
            "lora": LoraWeight(rand(6, 30), rand(20, 6), alpha=12.0),
        }
    )


def _optimum(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt())


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_every_module_reaches_the_eckart_young_error(rank: int) -> None:
    adapter = _adapter()
    converted, report = lycoris_to_lora(adapter, ResizeOptions(rank=rank))
    for record in report:
        before, after = adapter.weights[record.name], converted.weights[record.name]
        assert isinstance(after, LoraWeight) and after.rank <= rank
        delta = before.delta().double()
        error = float((delta - after.delta().double()).norm())
        optimum = _optimum(delta, after.rank)
        scale = float(delta.norm())
        # float32 SVDs: ≤ 1.001× the optimum, plus a few ulps of ‖ΔW‖ for ranks that keep everything
        assert error <= 1.001 * optimum + 1e-5 * scale, record
        # float32 relative error vs recomputed here; abs for near-exact ranks
        assert record.relative_error == pytest.approx(error / scale, rel=1e-3, abs=1e-5)


def test_convs_stay_conv_loras() -> None:
    converted, _ = lycoris_to_lora(_adapter(), ResizeOptions(rank=4))
    for name, shape in (("lokr_conv", (8, 6, 3, 3)), ("loha_conv", (6, 4, 3, 3))):
        weight = converted.weights[name]
        assert isinstance(weight, LoraWeight) and weight.weight_shape == shape
        down, up = lycoris.stored_factors(weight)
        assert down.shape == (weight.rank, *shape[1:]) and up.shape == (shape[0], weight.rank, 1, 1)


def test_energy_and_budget_rules() -> None:
    adapter = _adapter()
    _, by_energy = lycoris_to_lora(adapter, ResizeOptions(energy=0.9))
    assert all(r.energy_kept >= 0.9 - 1e-9 for r in by_energy)  # rounding of the energy sums
    _, by_budget = lycoris_to_lora(adapter, ResizeOptions(budget=12))
    assert sum(r.rank for r in by_budget) <= 12 and all(r.rank >= 1 for r in by_budget)


def test_a_lora_module_below_the_rank_is_kept_bit_for_bit() -> None:
    adapter = _adapter()
    converted, _ = lycoris_to_lora(adapter, ResizeOptions(rank=16))
    assert converted.weights["lora"] is adapter.weights["lora"]


def test_similarity_of_a_lycoris_adapter_and_its_full_rank_lora() -> None:
    from loratools.ops.similarity import adapter_similarity

    adapter = _adapter()
    exact, _ = lycoris_to_lora(adapter, ResizeOptions(energy=1.0))  # the same ΔW as plain LoRA
    report = adapter_similarity(adapter, exact)
    for module in report.modules:
        # the same row space: every principal cosine is 1 (float64 bases of float32 factors)
        assert float(module.cosines.min()) > 1 - 1e-4, module.name


def test_combine_keeps_a_conv_a_conv_lora() -> None:
    from loratools.ops.combine import CombineOptions, combine_adapters

    adapter = _adapter()
    result = combine_adapters([adapter, adapter], CombineOptions(weights=(0.5, 0.5)))
    for name in ("lokr_conv", "loha_conv"):
        weight = result.adapter.weights[name]
        assert weight.weight_shape == adapter.weights[name].weight_shape
        # the exact sum: 0.5·ΔW + 0.5·ΔW, float32 products of a few hundred terms
        torch.testing.assert_close(weight.delta(), adapter.weights[name].delta(), rtol=1e-4, atol=1e-4)
