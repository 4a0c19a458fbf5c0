"""The ModuleWeight protocol: every kind offers a 2-D delta with an exact factored form."""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import LoraWeight, ModuleWeight, base_weight_shape
from tests.tolerances import TOL


def test_lora_weight_is_a_module_weight() -> None:
    w = LoraWeight(torch.randn(4, 6), torch.randn(5, 4), alpha=8.0)
    assert isinstance(w, ModuleWeight)
    assert w.kind == "lora"
    assert base_weight_shape(w) == (5, 6)
    left, right = w.scaled_factors()
    torch.testing.assert_close(left @ right, w.delta(), **TOL[torch.float32])


def test_conv_lora_reshapes_onto_its_kernel() -> None:
    # conv LoRA: lora_down (r, in, kh, kw) flattened to A (r, in·kh·kw); ΔW reshapes to the kernel
    down, up = torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)
    w = LoraWeight(down.flatten(1), up.flatten(1), alpha=2.0, weight_shape=(4, 3, 3, 3))
    assert base_weight_shape(w) == (4, 3, 3, 3)
    # the conv of the two stacked convs is ΔW: up ∘ down (1×1 after kh×kw) = (up·down) reshaped
    x = torch.randn(1, 3, 7, 7)
    two_convs = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), up)
    one_conv = torch.nn.functional.conv2d(x, w.delta().reshape(4, 3, 3, 3) / w.scale)
    torch.testing.assert_close(one_conv, two_convs, rtol=1e-4, atol=1e-5)  # float32 sums of 27 terms


def test_weight_shape_must_flatten_to_the_delta() -> None:
    with pytest.raises(ValueError, match="does not flatten"):
        LoraWeight(torch.randn(2, 27), torch.randn(4, 2), alpha=2.0, weight_shape=(4, 3, 3, 2))
