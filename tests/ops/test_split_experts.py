"""Fused-expert LoRA → per-expert 2-D modules (``convert --split-experts``): PEFT is the judge.

Qwen3-MoE keeps its experts fused in memory ((E, 2·I, H) with [gate; up] concatenated) but
stores one 2-D weight per expert on disk (``experts.<e>.gate_proj`` …). A PEFT
``target_parameters`` LoRA on the in-memory model, split per expert and merged by loratools into
the on-disk checkpoint, must give PEFT's logits. gpt-oss interleaves gate and up columns and
stores (E, in, out): its split deltas must be PEFT's delta slices, transposed and de-interleaved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter
from loratools.errors import UnknownFormat
from loratools.kinds.fused import split_experts
from tests._tolerances import LOGITS_FP32, TOL

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.ops.test_fused_experts import (  # noqa: E402
    EXPERTS_MODULE,
    _our_weights,
    _peft_model,
    _qwen3_moe,
    _saved,
    _wrappers,
)


def test_split_qwen3_moe_merged_on_disk_equals_peft(tmp_path: Path) -> None:
    from loratools.commands.merge import merge_paths
    from loratools.io.adapter_dir import save_adapter

    model, base = _peft_model(_qwen3_moe)
    weights = _our_weights(model, base, False)
    split = split_experts(Adapter(weights), "Qwen3MoeForCausalLM")
    names = {f"{EXPERTS_MODULE}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(split.weights) == names  # 2 fused parameters × 4 experts → 3 modules × 4 experts
    fresh = _qwen3_moe()
    fresh.load_state_dict(base)
    fresh.save_pretrained(tmp_path / "base")  # on disk: one 2-D weight per expert
    save_adapter(split, tmp_path / "split")
    merge_paths(str(tmp_path / "base"), tmp_path / "m", add=[(str(tmp_path / "split"), 1.0)])
    merged = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, **LOGITS_FP32)
        assert (fresh.eval()(ids).logits - model(ids).logits).abs().max() > 1e-2  # the delta shows


def test_split_gpt_oss_through_the_cli_is_peft_delta_deinterleaved(run_cli, tmp_path: Path) -> None:
    base, adapter, model = _saved(tmp_path)
    out = tmp_path / "split"
    no_base = run_cli("convert", adapter, "--to", "peft", "-o", out, "--split-experts")
    assert no_base.exit_code == 1 and "--base" in no_base.stderr and not out.exists()
    result = run_cli(
        "convert", adapter, "--to", "peft", "-o", out, "--base", base, "--split-experts", "--json"
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert "target_parameters" not in config  # plain per-expert modules now

    kohya = run_cli("convert", adapter, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", base)
    assert kohya.exit_code == 1 and "--split-experts" in kohya.stderr  # kohya cannot hold fused experts
    kohya = run_cli(
        "convert",
        adapter,
        "--to",
        "kohya",
        "-o",
        tmp_path / "k.safetensors",
        "--base",
        base,
        "--split-experts",
    )
    assert kohya.exit_code == 0, kohya.output

    from loratools.io.adapter_dir import load_adapter

    split = load_adapter(out)
    for wrapper in _wrappers(model):
        delta = wrapper.get_delta_weight("default").float()  # (E, in, out)
        for e in range(delta.shape[0]):
            linear = delta[e].T  # the per-expert nn.Linear layout (out, in)
            prefix = f"{EXPERTS_MODULE}.{e}"
            if wrapper.parameter_name == "down_proj":
                torch.testing.assert_close(split.delta(f"{prefix}.down_proj"), linear, **TOL[torch.float32])
            else:  # gate_up: gate = columns 0::2, up = 1::2 of (in, 2·I), i.e. rows of (2·I, in)
                torch.testing.assert_close(
                    split.delta(f"{prefix}.gate_proj"), linear[0::2], **TOL[torch.float32]
                )
                torch.testing.assert_close(
                    split.delta(f"{prefix}.up_proj"), linear[1::2], **TOL[torch.float32]
                )


def test_gate_up_needs_the_model_class() -> None:
    model, base = _peft_model(_qwen3_moe)
    weights = _our_weights(model, base, False)
    with pytest.raises(UnknownFormat, match="model class"):
        split_experts(Adapter(weights))
    down = {n: w for n, w in weights.items() if ".down_proj[" in n}  # nothing to de-interleave
    assert len(split_experts(Adapter(down)).weights) == 4


def test_convert_without_base_still_refuses_fused_adapters(run_cli, tmp_path: Path) -> None:
    _, adapter, _ = _saved(tmp_path)
    result = run_cli("convert", adapter, "--to", "peft", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "needs the base model" in result.stderr
