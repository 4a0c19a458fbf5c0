"""Tests for loratools.ops.extract: exact recovery, Eckart–Young optimality, rank rules, carrying, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.commands.extract import model_card
from loratools.distributed import Workers
from loratools.errors import LoratoolsError, ShapeMismatch
from loratools.io.checkpoint import open_checkpoint
from loratools.linalg import allocate_budget, rank_for_energy
from loratools.ops.extract import ExtractOptions, extract, plan_extraction
from tests.tolerances import RANDOMIZED_SVD, TOL


class Source:
    """A dict of tensors that reads like a Checkpoint (names, info, iter_tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(shape=tuple(self.tensors[name].shape), dtype=self.tensors[name].dtype)

    def iter_tensors(self, names: list[str], prefetch: bool = True):
        for name in names:
            yield name, self.tensors[name]


def low_rank(d: int, k: int, spectrum: list[float], gen: torch.Generator) -> torch.Tensor:
    """U diag(spectrum) Vᵀ with random orthonormal U (d, r), V (k, r)."""
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64)).Q
    return (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T


def pair(deltas: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """(base, fine-tune) sources: random base weights, fine-tune = base + delta (float32)."""
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(*d.shape, generator=gen) * 0.1 for n, d in deltas.items()}
    base.update(extra or {})
    ft = {n: (base[n].double() + d).float() for n, d in deltas.items()}
    ft.update(extra or {})
    return Source(base), Source(ft)


def true_delta(base: Source, ft: Source, name: str) -> torch.Tensor:
    return ft.tensors[name + ".weight"].double() - base.tensors[name + ".weight"].double()


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def test_recovers_merged_lora_to_float32_precision(fixtures_dir):
    """base + s·B·A merged, extracted at the LoRA's rank (and above it) gives back s·B·A."""
    base = open_checkpoint(fixtures_dir / "base")
    gen = torch.Generator().manual_seed(1)
    merged, planted = {}, {}
    for name in base.names():
        w = base.get(name)
        if name.endswith("proj.weight"):
            b, a = torch.randn(w.shape[0], 4, generator=gen), torch.randn(4, w.shape[1], generator=gen)
            planted[name.removesuffix(".weight")] = (8 / 4) * b @ a * 0.05
            w = w + planted[name.removesuffix(".weight")]
        merged[name] = w
    for rank in (4, 6):
        result = extract(base, Source(merged), ExtractOptions(rank=rank))
        assert set(result.adapter.weights) == set(planted)
        for module, planted_delta in planted.items():
            recovered = result.adapter.delta(module)
            stored = merged[module + ".weight"] - base.get(module + ".weight")  # ΔW as float32 stores it
            # float32 SVD of ΔW: backward error ~n·2⁻²⁴·‖ΔW‖ (n ≤ 64) < 1e-5·max|ΔW|
            torch.testing.assert_close(recovered, stored, rtol=0, atol=1e-5 * float(stored.abs().max()))
            # the same float32 SVD bound
            torch.testing.assert_close(
                recovered, planted_delta, rtol=0, atol=1e-5 * float(stored.abs().max())
            )
            assert result.adapter.weights[module].rank == rank
        # rank-r ΔW at rank r: exact up to float32 rounding
        assert max(m.relative_error for m in result.modules) < 1e-5


def test_fixture_pair_error_is_optimal_within_one_percent(fixtures_dir):
    """The planted rank-4 + noise pair: every module's error is the Eckart–Young optimum within 1%."""
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    for rank in (2, 4, 8):
        result = extract(base, ft, ExtractOptions(rank=rank))
        assert len(result.modules) == 14
        for report in result.modules:
            delta = ft.get(report.name + ".weight").double() - base.get(report.name + ".weight").double()
            best = optimal_error(delta, rank)
            # Eckart–Young: nothing beats the optimum; 1e-4 for float32 vs float64 SVD
            assert best <= report.relative_error * (1 + 1e-4)
            # randomized SVD: within 1% of optimal
            assert report.relative_error <= 1.01 * best, (report.name, rank)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(20, 90),
    k=st.integers(20, 90),
    rank=st.integers(1, 8),
    signal=st.integers(1, 10),
    noise=st.sampled_from([0.0, 1e-3, 3e-2]),
    seed=st.integers(0, 1000),
)
def test_eckart_young_residual(d, k, rank, signal, noise, seed):
    """‖ΔW − sBA‖²_F = Σ_{i>r} σᵢ² up to 1%, and an exact rank-≤r ΔW is recovered exactly."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = sorted(torch.rand(signal, generator=gen, dtype=torch.float64).add(0.1).tolist(), reverse=True)
    delta = low_rank(d, k, spectrum, gen) + noise * torch.randn(d, k, generator=gen, dtype=torch.float64)
    base, ft = pair({"m.weight": delta}, seed=seed)
    report = extract(base, ft, ExtractOptions(rank=rank)).modules[0]
    best = optimal_error(true_delta(base, ft, "m"), rank)
    # randomized SVD within 1% of the optimum; 2e-6: float32 rounding of a relative error
    assert report.relative_error <= 1.01 * best + 2e-6
    # never below the optimum beyond float32 rounding
    assert report.relative_error >= best * (1 - 1e-3) - 2e-6
    assert report.rank == min(rank, d, k)


def test_randomized_matches_exact_svd(fixtures_dir):
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    fast = extract(base, ft, ExtractOptions(rank=4))
    exact = extract(base, ft, ExtractOptions(rank=4, exact=True))
    for module in fast.adapter.weights:
        torch.testing.assert_close(
            # the fixtures' ΔW are rank 4: a gap after σ₄
            fast.adapter.delta(module),
            exact.adapter.delta(module),
            **RANDOMIZED_SVD,
        )


def test_energy_rule_picks_smallest_rank_keeping_fraction():
    gen = torch.Generator().manual_seed(0)
    deltas = {f"m{i}.weight": low_rank(40, 30, [1.0, 0.5 * i, 0.3, 0.05], gen) for i in range(1, 4)}
    base, ft = pair(deltas)
    result = extract(base, ft, ExtractOptions(energy=0.95, max_rank=10))
    for report in result.modules:
        s = torch.linalg.svdvals(true_delta(base, ft, report.name))
        assert report.rank == rank_for_energy(s, 0.95)
        assert report.energy_kept >= 0.95 - 1e-6  # float32 energies of float32 σ's
        # ‖ΔW−BA‖/‖ΔW‖ = √(1 − energy kept) (Eckart–Young), both from float32 σ's and norms
        assert report.relative_error == pytest.approx(math.sqrt(1 - report.energy_kept), rel=1e-3, abs=1e-4)


def test_energy_rule_respects_max_rank():
    gen = torch.Generator().manual_seed(0)
    base, ft = pair({"m.weight": low_rank(40, 40, [1.0] * 10, gen)})
    report = extract(base, ft, ExtractOptions(energy=0.99, max_rank=3)).modules[0]
    assert report.rank == 3
    # 3 of 10 equal σ's; float32 σ's equal to ~1e-6
    assert report.energy_kept == pytest.approx(0.3, rel=1e-4)


def test_sv_threshold_keeps_singular_values_above_it():
    gen = torch.Generator().manual_seed(0)
    base, ft = pair(
        {"a.weight": low_rank(30, 30, [2.0, 1.0, 0.4, 0.1], gen), "b.weight": low_rank(30, 30, [0.2], gen)}
    )
    result = extract(base, ft, ExtractOptions(sv_threshold=0.3))
    assert result.adapter.ranks == {"a": 3}  # b has no σ ≥ 0.3
    assert "b.weight" in result.skipped


def test_budget_spends_total_rank_on_largest_singular_values():
    gen = torch.Generator().manual_seed(3)
    spectra = {f"m{i}.weight": sorted(torch.rand(8, generator=gen).tolist(), reverse=True) for i in range(4)}
    base, ft = pair({n: low_rank(48, 40, s, gen) for n, s in spectra.items()})
    result = extract(base, ft, ExtractOptions(budget=13, max_rank=8))
    assert sum(result.adapter.ranks.values()) == 13
    exact = {n: torch.linalg.svdvals(true_delta(base, ft, n.removesuffix(".weight"))) for n in spectra}
    ordered = torch.cat(list(exact.values())).sort(descending=True).values
    assert float(ordered[12] - ordered[13]) > 1e-3  # a gap at the budget's edge: the choice is unique
    expected = allocate_budget(exact, 13, max_rank=8)
    assert result.adapter.ranks == {n.removesuffix(".weight"): r for n, r in expected.items()}


def test_budget_below_module_count_is_an_error():
    gen = torch.Generator().manual_seed(0)
    base, ft = pair({f"m{i}.weight": low_rank(20, 20, [1.0], gen) for i in range(3)})
    with pytest.raises(LoratoolsError, match="--budget 2 is less than the 3"):
        extract(base, ft, ExtractOptions(budget=2))


@pytest.mark.parametrize(("split", "alpha"), [("sqrt", None), ("b", None), ("sqrt", 16.0), ("b", 2.0)])
def test_split_and_alpha_keep_the_product(split, alpha):
    gen = torch.Generator().manual_seed(0)
    base, ft = pair({"m.weight": low_rank(30, 20, [1.0, 0.5, 0.25], gen)})
    weight = extract(base, ft, ExtractOptions(rank=3, split=split, alpha=alpha)).adapter.weights["m"]
    assert weight.alpha == (alpha or 3.0)
    # rank-3 ΔW at rank 3, |ΔW| ≤ 1: exact up to float32 SVD rounding
    torch.testing.assert_close(weight.delta().double(), true_delta(base, ft, "m"), rtol=0, atol=1e-6)
    if split == "b":  # A = Vᵀ·(r/alpha) has orthogonal rows
        gram = weight.a @ weight.a.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), **TOL[torch.float32])
    else:  # balanced: ‖B‖_F = ‖A‖_F
        assert float(weight.b.norm()) == pytest.approx(float(weight.a.norm()), rel=1e-4)


def test_output_dtype_follows_finetune_unless_given():
    gen = torch.Generator().manual_seed(0)
    base, ft = pair({"m.weight": low_rank(30, 20, [1.0, 0.5], gen)})
    bf16 = Source({n: t.bfloat16() for n, t in ft.tensors.items()})
    base16 = Source({n: t.bfloat16() for n, t in base.tensors.items()})
    result = extract(base16, bf16, ExtractOptions(rank=2))
    assert result.adapter.weights["m"].dtype == torch.bfloat16
    assert result.modules[0].relative_error < 2e-2  # bf16 rounding of the weights and the factors
    forced = extract(base16, bf16, ExtractOptions(rank=2, dtype=torch.float32))
    assert forced.adapter.weights["m"].dtype == torch.float32


def test_shape_mismatch_names_tensors_and_option():
    base = Source({"m.weight": torch.zeros(4, 4), "model.embed_tokens.weight": torch.zeros(10, 4)})
    ft = Source({"m.weight": torch.ones(4, 4), "model.embed_tokens.weight": torch.ones(12, 4)})
    with pytest.raises(
        ShapeMismatch, match=r"model\.embed_tokens\.weight \[10, 4\] → \[12, 4\].*--include-embeddings"
    ):
        plan_extraction(base, ft, ExtractOptions(rank=1))
    result = extract(base, ft, ExtractOptions(rank=1, include_embeddings=True))
    assert result.adapter.saved_modules["model.embed_tokens.weight"].shape == (12, 4)
    bad = Source({"m.weight": torch.ones(4, 5), "model.embed_tokens.weight": torch.ones(10, 4)})
    with pytest.raises(ShapeMismatch, match=r"m\.weight \[4, 4\] → \[4, 5\]"):
        plan_extraction(base, bad, ExtractOptions(rank=1, include_embeddings=True))


def test_nan_in_delta_names_the_tensor():
    gen = torch.Generator().manual_seed(0)
    base, ft = pair(
        {"good.weight": low_rank(8, 8, [1.0], gen), "layer.bad.weight": low_rank(8, 8, [1.0], gen)}
    )
    ft.tensors["layer.bad.weight"][2, 3] = float("nan")
    with pytest.raises(LoratoolsError, match=r"layer\.bad\.weight contains NaN or Inf"):
        extract(base, ft, ExtractOptions(rank=1))


def test_non_matrix_and_embedding_diffs_are_reported_then_carried_on_request():
    gen = torch.Generator().manual_seed(0)
    norm, embed = torch.ones(8), torch.randn(16, 8, generator=gen)
    base = Source({"model.embed_tokens.weight": embed, "l.q.weight": torch.zeros(8, 8), "l.q.bias": torch.zeros(8),
                   "l.norm.weight": norm, "l.same.weight": norm.clone()})  # fmt: skip
    ft = Source({"model.embed_tokens.weight": embed + 1, "l.q.weight": low_rank(8, 8, [1.0], gen).float(),
                 "l.q.bias": torch.ones(8), "l.norm.weight": norm * 2, "l.same.weight": norm.clone()})  # fmt: skip
    plain = extract(base, ft, ExtractOptions(rank=1))
    assert plain.adapter.saved_modules == {}
    assert set(plain.skipped) == {"model.embed_tokens.weight", "l.q.bias", "l.norm.weight"}
    assert "--include-embeddings" in plain.skipped["model.embed_tokens.weight"]
    assert "--modules-to-save" in plain.skipped["l.norm.weight"]
    assert plain.unchanged == ["l.same.weight"]
    carried = extract(base, ft, ExtractOptions(rank=1, modules_to_save=True, include_embeddings=True))
    assert set(carried.adapter.saved_modules) == {"model.embed_tokens.weight", "l.norm.weight"}
    torch.testing.assert_close(carried.adapter.saved_modules["l.norm.weight"], norm * 2)
    assert set(carried.skipped) == {"l.q.bias"}  # its module carries LoRA factors; PEFT cannot save both


@pytest.mark.parametrize(
    ("targets", "expected"),
    [(("q_proj",), {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
     (("q_proj", "down_proj"), {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}),
     ((r"model\.layers\.1\..*_proj",), {f"model.layers.1.{m}" for m in (
         "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")})],
)  # fmt: skip
def test_targets_select_modules_like_peft(fixtures_dir, targets, expected):
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    result = extract(base, ft, ExtractOptions(rank=2, targets=targets))
    assert set(result.adapter.weights) == expected
    assert "model.layers.0.self_attn.k_proj.weight" in result.skipped or len(expected) == 7


def test_targets_matching_nothing_is_an_error(fixtures_dir):
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    with pytest.raises(LoratoolsError, match="--targets nope selects no 2-D weight: none of the 16 shared"):
        plan_extraction(base, ft, ExtractOptions(rank=2, targets=("nope",)))


def test_unchanged_checkpoints_are_an_error(fixtures_dir):
    base = open_checkpoint(fixtures_dir / "base")
    with pytest.raises(LoratoolsError, match="no targeted weight differs"):
        extract(base, base, ExtractOptions(rank=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "exactly one"), ({"rank": 2, "energy": 0.9}, "got --rank, --energy"), ({"energy": 1.5}, "--energy"),
     ({"rank": 0}, "--rank"), ({"rank": 2, "max_rank": 4}, "--max-rank"), ({"budget": 4, "alpha": -1.0}, "--alpha"),
     ({"rank": 2, "targets": ("q_proj[",)}, "not a valid regex")],
)  # fmt: skip
def test_options_are_validated(kwargs, message):
    with pytest.raises(LoratoolsError, match=message):
        ExtractOptions(**kwargs)


def test_sharing_then_merging_equals_one_process(fixtures_dir):
    """Each of N simulated workers factors its round-robin share; together they cover everything once."""
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    items = plan_extraction(base, ft, ExtractOptions(rank=4)).items
    shares = [Workers(rank, 3).share(items) for rank in range(3)]
    assert sorted(i.name for share in shares for i in share) == sorted(i.name for i in items)
    assert all(abs(len(a) - len(b)) <= 1 for a in shares for b in shares)


def test_provenance_and_model_card(fixtures_dir):
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    result = extract(base, ft, ExtractOptions(rank=4), base_model="org/base", finetuned_model="org/ft")
    p = result.adapter.provenance
    assert (p["method"], p["base"], p["finetuned"], p["rule"], p["rank"]) == (
        "extract",
        "org/base",
        "org/ft",
        "rank",
        4,
    )
    assert 0.99 < p["energy_kept"] <= 1
    card = model_card(result)
    assert (
        'base_model: "org/base"' in card and "| `finetuned` | org/ft |" in card and "| rank r | 4 |" in card
    )
    assert "| energy kept (Σ kept σ² / Σ ‖ΔW‖²) |" in card
    summary = result.summary()
    assert "output" not in summary  # the command's report puts it first
    assert {"name", "rank", "relative_error"} <= set(summary["modules"][0])


@pytest.mark.gpu
def test_cuda_matches_cpu(fixtures_dir):
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    cpu = extract(base, ft, ExtractOptions(rank=4))
    gpu = extract(base, ft, ExtractOptions(rank=4), workers=Workers(device=torch.device("cuda")))
    assert gpu.adapter.weights["model.layers.0.mlp.up_proj"].a.device.type == "cpu"
    for module in cpu.adapter.weights:
        # another device's randomized SVD of the fixtures' rank-4 ΔW (a gap after σ₄)
        torch.testing.assert_close(gpu.adapter.delta(module), cpu.adapter.delta(module), **RANDOMIZED_SVD)
    for one, two in zip(cpu.modules, gpu.modules, strict=True):
        assert two.relative_error == pytest.approx(one.relative_error, rel=1e-3)  # RANDOMIZED_SVD's rtol
