"""Batched SVDs for experts: the same error bounds as one SVD per matrix, and the same adapter.

The experts of one projection share a shape, so extract factors them as one stack (b, d, k)
(:func:`loratools.linalg.batched_randomized_svd`). Every matrix of the stack must be factored as
well as a separate :func:`~loratools.linalg.randomized_svd` would: within 0.1% of the
Eckart–Young optimum at or below the signal rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loratools import linalg
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.extract import ExtractOptions, extract
from loratools.ops.extract.batch import read_units
from loratools.ops.extract.plan import Item
from tests.ops.test_merge import write_checkpoint
from tests.ops.test_moe import BLOCK, EXPERTS, planted
from tests.test_linalg import FINDERS, low_rank_plus_noise, optimal_error_sq


def _stack(count: int, d: int, k: int, signal: int, noise: float) -> torch.Tensor:
    return torch.stack([low_rank_plus_noise(d, k, signal, noise=noise, seed=10 + i) for i in range(count)])


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize(("rank", "bound"), [(8, 1.001), (16, 1.001), (24, 1.01)])
def test_batched_error_is_within_bound_of_optimal_for_every_matrix(
    rank: int, bound: float, finder: str
) -> None:
    """Signal rank 16 in 300×200 with noise (tests/test_linalg.py's case), five of them at once;
    matrices leave the stack at different iterations."""
    stack = _stack(5, 300, 200, 16, noise=0.05)
    svds = linalg.batched_randomized_svd(stack, rank, range_copy=FINDERS[finder](stack))
    assert len(svds) == 5
    for m, svd in zip(stack, svds, strict=True):
        b, a = svd.factors()
        assert b.shape == (300, rank) and a.shape == (rank, 200)
        error = math.sqrt(float((m - b @ a).double().square().sum()))
        optimal = math.sqrt(optimal_error_sq(m, rank))
        # Eckart–Young: nothing beats optimal, up to float32 rounding of the norms
        assert optimal <= error * (1 + 1e-6)
        assert error <= bound * optimal


def test_batched_equals_one_svd_per_matrix() -> None:
    """The same sketch Ω per matrix: singular values as a separate call gives (float32 rounding)."""
    stack = _stack(4, 120, 90, 6, noise=0.01)
    for m, svd in zip(stack, linalg.batched_randomized_svd(stack, 6), strict=True):
        alone = linalg.randomized_svd(m, 6)
        # well separated top-6 spectrum: float32 SVDs agree to ~1e-5 relative
        torch.testing.assert_close(svd.s, alone.s, rtol=1e-4, atol=1e-5)
        # products of float32 factors (sign-free) from two runs of the same sketch: 10× the σ tolerance
        torch.testing.assert_close(svd.u * svd.s @ svd.vh, alone.u * alone.s @ alone.vh, rtol=1e-3, atol=1e-4)


def test_a_wide_sketch_takes_the_exact_batched_svd() -> None:
    stack = _stack(3, 20, 16, 3, noise=0.1)  # rank 6 + 8 oversampling ≥ 16 / 2
    for m, svd in zip(stack, linalg.batched_randomized_svd(stack, 6), strict=True):
        # the exact path: float32 LAPACK on both sides, σ agree to a few ulps of the largest (~1e-6)
        torch.testing.assert_close(svd.s, torch.linalg.svdvals(m)[:6], rtol=1e-5, atol=1e-6)


def test_read_units_groups_a_layers_experts_of_one_projection() -> None:
    items = [
        Item("a.experts.0.w1.weight", "lora", (4, 3)),
        Item("a.experts.0.w2.weight", "lora", (3, 4)),
        Item("q.weight", "lora", (3, 3)),
        Item("a.experts.1.w1.weight", "lora", (4, 3)),
        Item("b.experts.0.w1.weight", "lora", (4, 3)),  # another layer: another batch
        Item("a.experts.1.w2.weight", "lora", (3, 4)),
        Item("a.gate.weight", "other", (2, 3)),
    ]
    units = [[i.name for i in unit] for unit in read_units(items)]
    assert units == [
        ["a.experts.0.w1.weight", "a.experts.1.w1.weight"],
        ["a.experts.0.w2.weight", "a.experts.1.w2.weight"],
        ["q.weight"],
        ["b.experts.0.w1.weight"],
        ["a.gate.weight"],
    ]


def _experts(seed: int, hidden: int = 64, ffn: int = 96) -> dict[str, torch.Tensor]:
    """Mixtral names, two layers, experts large enough (64×96) for the randomized range finder."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        block = BLOCK.format(layer=layer)
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=gen)
        tensors[f"{block}.gate.weight"] = torch.randn(EXPERTS, hidden, generator=gen)
        for e in range(EXPERTS):
            for proj, shape in (("w1", (ffn, hidden)), ("w2", (hidden, ffn)), ("w3", (ffn, hidden))):
                tensors[f"{block}.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=gen) * 0.1
    return tensors


@pytest.fixture
def noisy_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Every expert weight gets a rank-2 change plus small full-rank noise (a real spectrum tail)."""
    base = _experts(0)
    tuned = planted(base, [n for n in base if ".experts." in n], rank=2)
    gen = torch.Generator().manual_seed(4)
    tuned = {
        n: t + 1e-3 * torch.randn(t.shape, generator=gen) if ".experts." in n else t for n, t in tuned.items()
    }
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "ft", tuned)


@pytest.mark.parametrize(
    "options",
    [
        ExtractOptions(rank=2),
        ExtractOptions(energy=0.99),
        ExtractOptions(budget=40),
        ExtractOptions(rank=2, exact=True),
    ],
    ids=["rank", "energy", "budget", "exact"],
)
def test_extract_per_expert_errors_are_eckart_young(
    noisy_pair: tuple[Path, Path], options: ExtractOptions
) -> None:
    base, ft = noisy_pair
    result = extract(open_checkpoint(base), open_checkpoint(ft), options)
    assert result is not None and result.experts is not None
    assert result.experts.touched == result.experts.base == 2 * EXPERTS * 3  # every expert, every rule
    base_t, ft_t = open_checkpoint(base), open_checkpoint(ft)
    for module in result.modules:
        if ".experts." not in module.name:
            continue
        name = f"{module.name}.weight"
        delta = (ft_t.get(name) - base_t.get(name)).double()
        s = torch.linalg.svdvals(delta)
        optimal = float(s[module.rank :].square().sum().sqrt() / s.square().sum().sqrt())
        # float32 SVDs of 96×64 slices: 0.1% of the optimum, plus float32 rounding of ‖ΔW‖
        assert optimal - 1e-5 <= module.relative_error <= 1.001 * optimal + 1e-5, module.name
    if options.budget is not None:
        assert sum(m.rank for m in result.modules) <= options.budget


def test_routers_and_other_modules_keep_their_place(noisy_pair: tuple[Path, Path]) -> None:
    base, ft = noisy_pair
    result = extract(open_checkpoint(base), open_checkpoint(ft), ExtractOptions(rank=2))
    assert result is not None
    names = [m.name for m in result.modules]
    assert names == sorted(names, key=lambda n: list(open_checkpoint(ft).names()).index(f"{n}.weight"))
    assert f"{BLOCK.format(layer=0)}.experts.0.w1" in result.adapter.weights
