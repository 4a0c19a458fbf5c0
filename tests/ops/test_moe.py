"""Mixture of experts: every expert weight is counted, and a changed expert is never dropped silently.

Fast tests use a hand-written Mixtral-named checkpoint; the slow one builds transformers'
MixtralForCausalLM from a tiny config (random weights; on disk one 2-D weight per expert) and
checks that extract → merge gives back the fine-tune's logits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loratools.errors import LoratoolsError
from loratools.formats import LoadContext
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.extract import ExtractOptions, extract
from loratools.ops.moe import count_experts, is_expert, is_router
from tests.ops.test_merge import read_all, write_checkpoint

BLOCK = "model.layers.{layer}.block_sparse_moe"
EXPERTS, HIDDEN, FFN = 4, 16, 24


def moe_tensors(seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """Mixtral's on-disk names: per-expert w1/w3 (ffn, hidden), w2 (hidden, ffn), a router (E, hidden)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        block = BLOCK.format(layer=layer)
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=gen)
        tensors[f"{block}.gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=gen)
        for e in range(EXPERTS):
            for proj, shape in (("w1", (FFN, HIDDEN)), ("w2", (HIDDEN, FFN)), ("w3", (FFN, HIDDEN))):
                tensors[f"{block}.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=gen) * 0.1
    return tensors


def planted(
    tensors: dict[str, torch.Tensor], names: list[str], rank: int = 2, seed: int = 5
) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` with a rank-``rank`` change on each of ``names``."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in names:
        d, k = out[name].shape
        out[name] = (
            out[name] + torch.randn(d, rank, generator=gen) @ torch.randn(rank, k, generator=gen) * 0.05
        )
    return out


@pytest.fixture
def moe_pair(tmp_path: Path) -> tuple[Path, Path]:
    base = moe_tensors(0)
    changed = [n for n in base if is_expert(n) or is_router(n)] + ["model.layers.0.self_attn.q_proj.weight"]
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(
        tmp_path / "ft", planted(base, changed)
    )


def test_names_experts_and_routers() -> None:
    assert is_expert("model.layers.3.block_sparse_moe.experts.7.w1.weight")
    assert is_expert("model.layers.3.mlp.experts.12.gate_proj.weight")
    assert not is_expert("model.layers.3.mlp.shared_expert.gate_proj.weight")
    assert is_router("model.layers.3.block_sparse_moe.gate.weight")
    assert is_router("model.layers.3.mlp.shared_expert_gate.weight")
    assert not is_router("model.layers.3.mlp.gate_proj.weight")
    assert count_experts(["model.layers.0.mlp.gate_proj.weight"], []) is None  # not a MoE


def test_extract_factors_every_expert_and_carries_routers(moe_pair: tuple[Path, Path]) -> None:
    base, ft = moe_pair
    result = extract(open_checkpoint(base), open_checkpoint(ft), ExtractOptions(rank=2))
    experts = result.summary()["experts"]
    assert experts == {
        "base": 2 * EXPERTS * 3,
        "experts": 2 * EXPERTS,
        "touched": 2 * EXPERTS * 3,
        "dropped": [],
        "routers": [f"{BLOCK.format(layer=layer)}.gate.weight" for layer in range(2)],
    }
    assert set(result.saved) == set(experts["routers"])  # carried whole, not factored
    assert max(m.relative_error for m in result.modules) < 1e-5  # rank-2 changes at rank 2


def test_extract_fails_when_one_experts_delta_would_be_dropped(
    moe_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, ft = moe_pair
    # a regex that covers experts 0–2 only: expert 3's changed weights would be lost
    targets = (r".*experts\.[0-2]\.w[123]|.*q_proj",)
    with pytest.raises(
        LoratoolsError, match=r"6 of 24 expert weights changed but would be dropped.*experts\.3\.w1"
    ):
        extract(open_checkpoint(base), open_checkpoint(ft), ExtractOptions(rank=2, targets=targets))


def test_cli_reports_expert_counts_and_refuses_to_drop(
    run_cli, moe_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, ft = moe_pair
    result = run_cli("extract", base, ft, "-r", "2", "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["experts"]["touched"] == 24
    bad = run_cli(
        "extract", base, ft, "-r", "2", "-o", tmp_path / "b", "--targets", r".*experts\.[0-2]\.w[123]"
    )
    assert bad.exit_code == 1 and "would be dropped" in bad.stderr and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_mixtral_extract_then_merge_gives_the_finetune_logits(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from loratools.commands.merge import merge_paths
    from loratools.io.adapter_dir import save_adapter
    from tests.peft_helpers import logits, tokens

    config = MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "base")  # on disk: one 2-D weight per expert
    base = read_all(tmp_path / "base")
    changed = [n for n in base if is_expert(n) or is_router(n)]
    write_checkpoint(tmp_path / "ft", planted(base, changed, seed=9))
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "ft" / "config.json")

    result = extract(
        open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "ft"), ExtractOptions(rank=2)
    )
    assert result.experts is not None and result.experts.touched == result.experts.base == 2 * EXPERTS * 3
    save_adapter(result.adapter, tmp_path / "a")
    merge_paths(str(tmp_path / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])

    def run(folder: Path) -> torch.Tensor:
        return logits(MixtralForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval(), tokens())

    expected = run(tmp_path / "ft")
    assert (expected - run(tmp_path / "base")).abs().max() > 1e-3  # the experts' changes matter
    torch.testing.assert_close(run(tmp_path / "m"), expected, rtol=1e-4, atol=1e-5)  # float32, a few layers


def test_merge_reports_expert_weights_touched_against_the_base(
    moe_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from loratools.commands.merge import merge_paths
    from loratools.io.adapter_dir import save_adapter

    base, ft = moe_pair
    result = extract(open_checkpoint(base), open_checkpoint(ft), ExtractOptions(rank=2))
    save_adapter(result.adapter, tmp_path / "a")
    report = merge_paths(str(base), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    experts = report.to_dict()["experts"]
    assert experts["base"] == experts["touched"] == 2 * EXPERTS * 3 and experts["dropped"] == []
    assert experts["routers"] == [f"{BLOCK.format(layer=layer)}.gate.weight" for layer in range(2)]
    merged, wanted = read_all(tmp_path / "m"), read_all(ft)
    for name in merged:  # rank-2 changes at rank 2, carried routers: the fine-tune, to float32 rounding
        torch.testing.assert_close(merged[name], wanted[name], rtol=1e-5, atol=1e-5)


def test_peft_target_parameters_adapters_are_refused_by_name() -> None:
    from loratools.errors import UnknownFormat
    from loratools.formats import peft

    # what PEFT writes for target_parameters on a fused Mixtral layer: nested ParamWrapper keys
    # that do not say which parameter (gate_up_proj or down_proj) they belong to
    tensors = {
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight": torch.zeros(8, 16),
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight": torch.zeros(48, 8),
    }
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj"],
    }
    with pytest.raises(UnknownFormat, match=r"target_parameters.*mlp\.experts\.gate_up_proj"):
        peft.to_adapter(tensors, context=LoadContext(config=config))


def test_spectrum_reports_expert_weights_against_the_base(
    moe_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from loratools.ops.spectrum import adapter_spectrum, delta_spectrum

    base, ft = moe_pair
    report = delta_spectrum(open_checkpoint(base), open_checkpoint(ft))
    assert report.to_dict()["experts"] == {
        "base": 24, "experts": 8, "touched": 24, "dropped": [], "routers": []
    }  # fmt: skip
    adapter = extract(open_checkpoint(base), open_checkpoint(ft), ExtractOptions(rank=2)).adapter
    two = {n: w for n, w in adapter.weights.items() if ".experts.0.w" in n and ".layers.0." in n}
    assert len(two) == 3  # the amplification factor (with a base) costs ~0.25 s per module: keep few
    with_base = adapter_spectrum(replace(adapter, weights=two), base=open_checkpoint(base)).to_dict()[
        "experts"
    ]
    assert with_base["touched"] == 3 and with_base["base"] == 24
    assert adapter_spectrum(adapter).to_dict()["experts"] is None  # no base: nothing to count against
