"""extract on fused 3-D expert tensors (gpt-oss ``experts.gate_up_proj`` (E, in, out)): PEFT is the judge.

A tiny gpt-oss built from a config (random weights) is the base; the fine-tune changes every
expert slice of both fused parameters (and one attention weight). extract must write PEFT's
``target_parameters`` LoRA: PEFT loads it on the base model and its logits equal a merge of the
same adapter by loratools; each expert's error is the rank-r Eckart–Young error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loratools.errors import LoratoolsError, ShapeMismatch
from loratools.io.checkpoint import open_checkpoint
from loratools.kinds.fused import fused_layout, fused_name, wrapper_depths
from loratools.ops.extract import ExtractOptions, extract
from tests._tolerances import LOGITS_FP32
from tests.ops.test_merge import read_all, write_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.ops.test_fused_experts import ALL_EXPERTS_TOUCHED, EXPERTS_MODULE, _gpt_oss  # noqa: E402

PARAMS = (f"{EXPERTS_MODULE}.gate_up_proj", f"{EXPERTS_MODULE}.down_proj")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _base(folder: Path, intermediate: int = 12) -> dict[str, torch.Tensor]:
    """A gpt-oss base folder (weights N(0, 0.2²): random init leaves fused experts empty in some versions)."""
    torch.manual_seed(0)
    model = _gpt_oss(intermediate)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return read_all(folder)


def _finetune(
    folder: Path, base: dict[str, torch.Tensor], ranks: dict[str, list[int]], base_dir: Path, seed: int = 3
) -> None:
    """The base with a change of rank ``ranks[param][e]`` on each expert slice (0: unchanged), and
    a rank-2 change on q_proj; config.json copied (its ``architectures`` name the model class)."""
    gen = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for name, per_expert in ranks.items():
        w = tuned[name].clone()
        for e, r in enumerate(per_expert):
            p, q = w.shape[-2:]
            w[e] += torch.randn(p, r, generator=gen) @ torch.randn(r, q, generator=gen) * 0.1
        tuned[name] = w
    d, k = tuned[Q_PROJ].shape
    tuned[Q_PROJ] = tuned[Q_PROJ] + torch.randn(d, 2, generator=gen) @ torch.randn(2, k, generator=gen) * 0.1
    write_checkpoint(folder, tuned)
    shutil.copy(base_dir / "config.json", folder / "config.json")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = _base(tmp_path / "base")
    _finetune(tmp_path / "ft", base, {p: [2, 2, 2] for p in PARAMS}, tmp_path / "base")
    return tmp_path / "base", tmp_path / "ft"


def _logits(folder: Path | torch.nn.Module) -> torch.Tensor:
    model = (
        transformers.GptOssForCausalLM.from_pretrained(folder).eval() if isinstance(folder, Path) else folder
    )
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(ids).logits.float()


def _extract_and_write(base: Path, ft: Path, out: Path, options: ExtractOptions) -> dict:
    from loratools.io.adapter_dir import save_adapter

    result = extract(open_checkpoint(base), open_checkpoint(ft), options, model_class="GptOssForCausalLM")
    assert result is not None
    save_adapter(result.adapter, out)
    return result.summary()


def test_extract_writes_target_parameters_that_peft_loads_equal_to_our_merge(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from loratools.commands.merge import merge_paths

    base, ft = pair
    summary = _extract_and_write(base, ft, tmp_path / "a", ExtractOptions(rank=2))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(PARAMS)
    assert config["auto_mapping"]["base_model_class"] == "GptOssForCausalLM"
    # one report per (parameter, expert), like a 2-D module; rank-2 changes at rank 2: float32 exact
    experts = [m for m in summary["modules"] if "[" in m["name"]]
    assert sorted(m["name"] for m in experts) == sorted(fused_name(p, e) for p in PARAMS for e in range(3))
    # float32 residual of an exact rank-2 fit
    assert all(m["rank"] == 2 and m["relative_error"] < 1e-5 for m in experts)
    assert summary["experts"] == ALL_EXPERTS_TOUCHED

    merge_paths(str(base), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    fresh = transformers.GptOssForCausalLM.from_pretrained(base).eval()
    through_peft = _logits(peft.PeftModel.from_pretrained(fresh, str(tmp_path / "a")).eval())
    merged = _logits(tmp_path / "m")
    torch.testing.assert_close(through_peft, merged, **LOGITS_FP32)
    torch.testing.assert_close(merged, _logits(ft), **LOGITS_FP32)  # rank-2 changes: the fine-tune itself
    assert (merged - _logits(base)).abs().max() > 1e-2  # the experts' delta shows


def test_extract_merge_round_trip_is_eckart_young_per_expert(tmp_path: Path) -> None:
    from loratools.commands.merge import merge_paths
    from loratools.io.adapter_dir import save_adapter

    base = _base(tmp_path / "base")
    _finetune(tmp_path / "ft", base, {p: [6, 5, 4] for p in PARAMS}, tmp_path / "base")  # above rank 2
    tuned = read_all(tmp_path / "ft")
    result = extract(
        open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "ft"), ExtractOptions(rank=2)
    )  # no model class: the layout comes from the hidden size
    assert result is not None
    save_adapter(result.adapter, tmp_path / "a")
    merge_paths(str(tmp_path / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    merged = read_all(tmp_path / "m")
    reports = {m.name: m for m in result.modules}
    for param in PARAMS:
        for e in range(3):
            delta = (tuned[param][e] - base[param][e]).double()
            s = torch.linalg.svdvals(delta)
            optimal = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
            achieved = float(torch.linalg.vector_norm((merged[param][e] - tuned[param][e]).double()))
            achieved /= float(torch.linalg.vector_norm(delta))
            # small slices take the exact SVD; float32 factors and a float32 merge: 1e-4 slack
            assert optimal - 1e-5 <= achieved <= optimal * 1.001 + 1e-4
            # the report measures the same residual in float32 before the merge's rounding: same slack
            assert reports[fused_name(param, e)].relative_error == pytest.approx(optimal, rel=1e-3, abs=1e-4)


def test_energy_rule_shares_the_largest_expert_rank_and_peft_reads_its_rank_pattern(tmp_path: Path) -> None:
    base = _base(tmp_path / "base")
    ranks = {PARAMS[0]: [1, 3, 0], PARAMS[1]: [2, 1, 1]}  # expert 2 of gate_up unchanged
    _finetune(tmp_path / "ft", base, ranks, tmp_path / "base")
    summary = _extract_and_write(
        tmp_path / "base", tmp_path / "ft", tmp_path / "a", ExtractOptions(energy=0.9999, max_rank=8)
    )
    rank_of = {m["name"]: m["rank"] for m in summary["modules"]}
    assert rank_of[Q_PROJ.removesuffix(".weight")] == 2
    # per expert the rule picks 1, 3, 0 and 2, 1, 1; PEFT stores one r per parameter: the largest
    assert [rank_of[fused_name(p, e)] for p in PARAMS for e in range(3)] == [3, 3, 3, 2, 2, 2]
    # every rank covers its change: the residual is float32 rounding
    assert max(m["relative_error"] for m in summary["modules"]) < 1e-5
    assert summary["experts"]["touched"] == 6  # the unchanged expert is stored too (zero factors)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # r = 2 (q_proj, down_proj); gate_up_proj's 3 goes in PEFT's per-parameter rank_pattern
    assert (config["r"], config["rank_pattern"]) == (2, {PARAMS[0]: 3})
    fresh = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "base").eval()
    through_peft = _logits(peft.PeftModel.from_pretrained(fresh, str(tmp_path / "a")).eval())
    torch.testing.assert_close(through_peft, _logits(tmp_path / "ft"), **LOGITS_FP32)


def test_budget_counts_each_expert(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    result = extract(
        open_checkpoint(base), open_checkpoint(ft), ExtractOptions(budget=16), model_class="GptOssForCausalLM"
    )
    assert result is not None
    experts = [m for m in result.modules if "[" in m.name]
    assert len(experts) == 6
    for param in PARAMS:  # one r per fused parameter
        assert len({m.rank for m in experts if m.name.startswith(param + "[")}) == 1
    assert result.experts is not None and result.experts.touched == 6


def test_a_changed_fused_expert_tensor_is_never_dropped(pair: tuple[Path, Path]) -> None:
    base, ft = pair
    with pytest.raises(
        LoratoolsError, match=r"3 of 6 expert weights changed but would be dropped.*down_proj\[0\]"
    ):
        extract(
            open_checkpoint(base),
            open_checkpoint(ft),
            ExtractOptions(rank=2, targets=("q_proj", "gate_up_proj")),
        )


def test_cli_takes_the_model_class_from_config_json(run_cli, pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    result = run_cli("extract", base, ft, "-r", "2", "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["experts"]["touched"] == 6
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "GptOssForCausalLM"
    dora = run_cli("extract", base, ft, "-r", "2", "-o", tmp_path / "b", "--dora")
    assert dora.exit_code == 1 and "target_parameters" in dora.stderr and not (tmp_path / "b").exists()


def test_layout_from_the_model_class_or_the_hidden_size() -> None:
    gate_up, down = "m.experts.gate_up_proj", "m.experts.down_proj"
    assert fused_layout(gate_up, (4, 16, 24), "GptOssForCausalLM", None)
    assert not fused_layout(gate_up, (4, 16, 24), "Qwen3MoeForCausalLM", None)
    assert fused_layout(gate_up, (4, 16, 24), None, 16)  # (E, in = hidden, out)
    assert not fused_layout(gate_up, (4, 24, 16), None, 16)  # (E, out, in = hidden)
    assert fused_layout(down, (4, 12, 16), None, 16)  # (E, in, out = hidden)
    assert not fused_layout(down, (4, 16, 12), None, 16)
    with pytest.raises(ShapeMismatch, match="config.json"):
        fused_layout(down, (4, 16, 16), None, 16)  # square: only the class can tell
    # PEFT nests in registration order (gate_up, then down): the last one is outermost (depth 0)
    assert wrapper_depths([down, gate_up, "n.experts.w1"]) == {down: 0, gate_up: 1, "n.experts.w1": 0}
