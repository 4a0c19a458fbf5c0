"""``loratools combine`` and ``loratools resize``: flags, JSON, refusals, and PEFT as the judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.ops.combine import ties_merge
from tests.tolerances import F32_MATMUL

# the fixture base (Llama: hidden 32, 2 KV heads × 8, intermediate 64, 2 layers)
SHAPES = {
    "self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64),
}  # fmt: skip


def make_adapter(
    folder: Path,
    base: Path,
    leaves: list[str],
    ranks: list[int],
    alphas: list[float],
    rslora: bool,
    seed: int,
) -> Path:
    """A PEFT adapter on ``leaves`` of both layers, one (rank, alpha) per leaf, random non-zero B."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(2):
        for leaf, r, alpha in zip(leaves, ranks, alphas, strict=True):
            out_f, in_f = SHAPES[leaf]
            a = torch.randn(r, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, r, generator=gen) / r**0.5
            weights[f"model.layers.{layer}.{leaf}"] = LoraWeight(a, b, alpha, rslora)
    save_adapter(Adapter(weights=weights, base_model=str(base), task_type="CAUSAL_LM"), folder)
    return folder


def hand_delta(weight: LoraWeight) -> torch.Tensor:
    r = weight.a.shape[0]
    s = weight.alpha / math.sqrt(r) if weight.use_rslora else weight.alpha / r
    return s * weight.b.double() @ weight.a.double()


def dense_sum(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·Bᵢ·Aᵢ per module, in float64, from the input folders."""
    total: dict[str, torch.Tensor] = {}
    for folder, w in zip(folders, weights, strict=True):
        for name, weight in load_adapter(folder).weights.items():
            total[name] = total.get(name, 0) + w * hand_delta(weight)
    return total


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.fixture
def adapters(tmp_path: Path, fixtures_dir: Path) -> dict[str, Path]:
    base = fixtures_dir / "base"
    return {
        "peft": fixtures_dir / "adapter",  # r=4, alpha=8, q_proj and v_proj
        "rs": make_adapter(tmp_path / "rs", base, ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"],
                           [8, 8, 8], [16, 16, 16], True, 1),
        "mixed": make_adapter(tmp_path / "mixed", base, ["self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj"],
                              [2, 6, 3], [4, 3, 12], False, 2),
    }  # fmt: skip


# ---- flags, JSON and refusals -----------------------------------------------------------------


def test_combine_exact_json_and_output(run_cli, adapters, tmp_path) -> None:
    out = tmp_path / "sum"
    inputs = [adapters["peft"], adapters["rs"]]
    result = run_cli("combine", *inputs, "-o", out, "--weight", "1", "--weight", "-0.5", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["output"] == str(out) and doc["method"] == "exact" and doc["weights"] == [1.0, -0.5]
    by_name = {m["name"]: m for m in doc["modules"]}
    assert by_name["model.layers.0.self_attn.q_proj"]["rank"] == 12
    assert by_name["model.layers.0.self_attn.q_proj"]["sources"] == [0, 1]
    assert by_name["model.layers.0.mlp.down_proj"]["rank"] == 8
    expected = dense_sum(inputs, [1.0, -0.5])
    combined = load_adapter(out)
    assert set(combined.weights) == set(expected)
    for name, delta in expected.items():
        # float32 factors vs the float64 dense sum
        torch.testing.assert_close(combined.weights[name].delta().double(), delta, **F32_MATMUL)
    assert combined.provenance["method"] == "combine"


def test_combine_svd_table_on_stderr_and_energy(run_cli, adapters, tmp_path) -> None:
    result = run_cli("combine", adapters["peft"], adapters["mixed"], "-o", tmp_path / "e", "--energy", "0.9")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and "combine (svd)" in result.stderr and "energy kept" in result.stderr
    combined = load_adapter(tmp_path / "e")
    for name, delta in dense_sum([adapters["peft"], adapters["mixed"]], [1.0, 1.0]).items():
        s2 = torch.linalg.svdvals(delta).square()
        # rounding of the energy ratio
        assert float(s2[: combined.weights[name].rank].sum() / s2.sum()) >= 0.9 - 1e-6


def test_resize_json_energy_is_kept_per_module(run_cli, adapters, tmp_path) -> None:
    result = run_cli("resize", adapters["rs"], "-o", tmp_path / "r", "--energy", "0.8", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert all(m["energy_kept"] >= 0.8 and m["rank"] <= m["rank_before"] == 8 for m in doc["modules"])
    assert doc["rank_total"] < doc["rank_total_before"]
    resized = load_adapter(tmp_path / "r")
    assert {m["name"]: m["rank"] for m in doc["modules"]} == resized.ranks


def test_resize_budget_total(run_cli, adapters, tmp_path) -> None:
    result = run_cli("resize", adapters["mixed"], "-o", tmp_path / "b", "--budget", "10", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert sum(load_adapter(tmp_path / "b").ranks.values()) == json.loads(result.stdout)["rank_total"] == 10


def test_existing_output_refused_without_force(run_cli, adapters, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("combine", adapters["peft"], "-o", out, "-w", "-1")
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "--force" in result.stderr
    assert list(out.iterdir()) == []
    assert run_cli("combine", adapters["peft"], "-o", out, "-w", "-1", "--force").exit_code == 0
    assert load_adapter(out).weights


def test_shape_conflict_is_one_line_and_writes_nothing(run_cli, adapters, tmp_path) -> None:
    # an adapter whose q_proj is 16×32 (a different base) clashes with the fixture's 32×32
    other = tmp_path / "other"
    weights = {
        f"model.layers.{i}.self_attn.q_proj": LoraWeight(torch.zeros(2, 32), torch.ones(16, 2), 2.0)
        for i in range(2)
    }
    save_adapter(Adapter(weights=weights), other)
    result = run_cli("combine", adapters["peft"], other, "-o", tmp_path / "x")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "2 module(s) have different shapes" in result.stderr
    assert (
        "model.layers.0.self_attn.q_proj" in result.stderr
        and "model.layers.1.self_attn.q_proj" in result.stderr
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (
            ["-w", "1", "-w", "2", "-w", "3"],
            "3 --weight values for 2 adapters",
            1,
        ),  # parsed: not click's exit 2
        (["--method", "ties", "-r", "4"], "needs --density", 1),  # option values: a clear error, exit 1
        (["-r", "4", "--energy", "0.5"], "not both", 1),
    ],
)
def test_usage_errors(run_cli, adapters, tmp_path, args: list[str], message: str, code: int) -> None:
    result = run_cli("combine", adapters["peft"], adapters["rs"], "-o", tmp_path / "u", *args)
    assert result.exit_code == code and message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1  # one LoratoolsError line
    assert not (tmp_path / "u").exists()


def test_resize_needs_exactly_one_rule_and_output_must_not_be_the_input(
    run_cli, fixture_copy, tmp_path
) -> None:
    adapter = fixture_copy("adapter")
    result = run_cli("resize", adapter, "-o", tmp_path / "r")
    assert result.exit_code == 1 and "exactly one" in result.stderr
    before = (adapter / "adapter_model.safetensors").read_bytes()
    result = run_cli("resize", adapter, "-o", adapter, "-r", "2", "--force")
    assert result.exit_code == 1 and "overlaps the input" in result.stderr
    assert (adapter / "adapter_model.safetensors").read_bytes() == before


# ---- PEFT + transformers as the judge ---------------------------------------------------------


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def _base_plus(base: Path, deltas: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base with W0 + ΔW written into each weight by hand (the dense arithmetic)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, delta in deltas.items():
        state[f"{name}.weight"] += delta.float()
    model.load_state_dict(state)
    return _logits(model, ids)


@torch.no_grad()
def _through_peft(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return _logits(PeftModel.from_pretrained(model, adapter).eval(), ids)


def _judged_by_eckart_young(
    dense: dict[str, torch.Tensor], out: Path, ranks: dict[str, int] | None = None, ratio: float = 1.0
) -> dict[str, torch.Tensor]:
    """The written adapter's own products, after checking each is a near-optimal truncation of the
    dense delta: rank ≤ r and ‖ΔW − s·B·A‖_F ≤ ratio·‖ΔW − [ΔW]_r‖_F (Eckart–Young) + rounding.

    A truncation is not unique when σ_r ≈ σ_{r+1} (the fixtures' sums have σ5 = 3.049, σ6 = 3.045
    in one module), so the kept subspace — and PEFT's logits — may legitimately differ from
    ``truncated(ΔW, r)``'s; what must hold is the error. PEFT is then judged against the written
    product. Rounding: float32 factors of a delta with ‖ΔW‖_F ~ 10 carry ~1e-6·‖ΔW‖_F of error."""
    written = load_adapter(out)
    assert set(written.weights) == set(dense)
    for name, delta in dense.items():
        rank = ranks[name] if ranks else written.weights[name].rank
        assert written.weights[name].rank <= rank, name
        error = float((delta - hand_delta(written.weights[name])).norm())
        optimal = float((delta - truncated(delta, rank)).norm())
        # randomized SVD's allowance; 1e-5·‖ΔW‖ for float32 rounding
        assert error <= ratio * optimal + 1e-5 * float(delta.norm()), (name, error, optimal)
    return {name: hand_delta(weight) for name, weight in written.weights.items()}


def _expected(case: str, adapters: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    """The dense arithmetic each case must equal (or, for truncations, approximate optimally)."""
    three = [adapters["peft"], adapters["rs"], adapters["mixed"]]
    if case == "exact":
        return dense_sum(three, [1.0, -0.5, 2.0])
    if case == "svd":  # exact factored SVD: optimal up to float32 rounding
        dense = dense_sum(three, [0.7, 0.3, -1.0])
        return _judged_by_eckart_young(dense, out, {n: 5 for n in dense})
    if case == "negate":
        return dense_sum([adapters["rs"]], [-1.0])
    if case == "resize":
        dense = dense_sum([adapters["rs"]], [1.0])
        return _judged_by_eckart_young(dense, out, {n: 3 for n in dense})
    if case == "budget":  # the rank choice is tested in tests/ops; here: the rank_pattern PEFT reads
        ranks = load_adapter(out).ranks
        assert len(set(ranks.values())) > 1
        return _judged_by_eckart_young(dense_sum([adapters["mixed"]], [1.0]), out, ranks)
    assert case == "ties"
    # TIES re-factors a dense, nearly flat delta with the randomized SVD: the kept subspace may
    # differ from the exact truncation's, so check the error is near-optimal (Eckart–Young), then
    # let PEFT be judged against the adapter's own product.
    written = load_adapter(out)
    inputs = [load_adapter(p) for p in three[:2]]
    for name in set(inputs[0].weights) | set(inputs[1].weights):
        deltas = [
            w * a.weights[name].delta() for a, w in zip(inputs, (1.0, 0.6), strict=True) if name in a.weights
        ]
        ties = ties_merge(torch.stack(deltas), 0.5).double()
        error = float((ties - hand_delta(written.weights[name])).norm())
        optimal = float((ties - truncated(ties, 4)).norm())
        assert error <= 1.01 * optimal + 1e-6, name  # randomized SVD within 1%; 1e-6 float32 rounding
    return {name: hand_delta(weight) for name, weight in written.weights.items()}


CASES = {
    "exact": ["combine", "{peft}", "{rs}", "{mixed}", "-w", "1", "-w", "-0.5", "-w", "2"],
    "svd": ["combine", "{peft}", "{rs}", "{mixed}", "-w", "0.7", "-w", "0.3", "-w", "-1", "-r", "5"],
    "negate": ["combine", "{rs}", "-w", "-1"],
    "resize": ["resize", "{rs}", "-r", "3"],
    "budget": ["resize", "{mixed}", "--budget", "9"],
    "ties": [
        "combine",
        "{peft}",
        "{rs}",
        "-w",
        "1",
        "-w",
        "0.6",
        "--method",
        "ties",
        "--density",
        "0.5",
        "-r",
        "4",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_output_loads_in_peft_and_matches_the_dense_arithmetic(
    run_cli, adapters, fixtures_dir, tmp_path, case
):
    pytest.importorskip("peft")
    base, out = fixtures_dir / "base", tmp_path / "out"
    args = [a.format(**{k: str(v) for k, v in adapters.items()}) for a in CASES[case]]
    result = run_cli(*args, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    expected = _base_plus(base, _expected(case, adapters, out), ids)
    through_peft = _through_peft(base, out, ids)
    assert float((expected - _base_plus(base, {}, ids)).abs().max()) > 1e-2  # the adapter matters
    torch.testing.assert_close(through_peft, expected, rtol=1e-4, atol=1e-4)
