"""DoRA from the command line: inspect, convert (DoRA → plain LoRA), spectrum, extract --dora, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.dora import effective_delta

MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.down_proj": (32, 64)}


def write_dora(folder: Path, fixtures_dir: Path, rank: int = 4) -> Adapter:
    """A DoRA adapter on the fixture base: random factors, magnitudes 0.8–1.3 × ‖W0‖_row."""
    g = torch.Generator().manual_seed(11)
    ckpt = open_checkpoint(fixtures_dir / "base")
    weights = {}
    for module, (out, inp) in MODULES.items():
        w0 = ckpt.get(f"{module}.weight").float()
        m = w0.norm(dim=1) * (0.8 + 0.5 * torch.rand(out, generator=g))
        weights[module] = LoraWeight(
            torch.randn(rank, inp, generator=g) * 0.3,
            torch.randn(out, rank, generator=g) * 0.3,
            8.0,
            magnitude=m,
        )
    adapter = Adapter(weights, base_model=str(fixtures_dir / "base"), task_type="CAUSAL_LM")
    save_adapter(adapter, folder)
    return adapter


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def test_convert_dora_to_lora_reports_near_optimal_errors(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    adapter = write_dora(tmp_path / "dora", fixtures_dir)
    result = run_cli(
        "convert", tmp_path / "dora", "--to", "peft", "-o", tmp_path / "lora", "--base", fixtures_dir / "base",
        "-r", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = {m["name"]: m for m in json.loads(result.stdout)["dora_baked"]}
    baked = load_adapter(tmp_path / "lora")
    ckpt = open_checkpoint(fixtures_dir / "base")
    for module, weight in adapter.weights.items():
        delta = effective_delta(ckpt.get(f"{module}.weight").float(), weight)
        lora = baked.weights[module]
        assert lora.kind == "lora" and lora.rank == 3
        error = float((delta - lora.delta()).norm() / delta.norm())
        assert error == pytest.approx(report[module]["relative_error"], rel=1e-3)
        assert error <= 1.01 * optimal_error(delta, 3) + 1e-6  # Eckart–Young, randomized SVD


def test_dora_to_gguf_needs_a_rank_and_plain_lora_refuses_one(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    write_dora(tmp_path / "dora", fixtures_dir)
    out = tmp_path / "x.gguf"
    result = run_cli("convert", tmp_path / "dora", "--to", "gguf", "-o", out, "--base", fixtures_dir / "base")
    assert result.exit_code == 1 and "llama.cpp does not run" in result.stderr and not out.exists()
    result = run_cli("convert", fixtures_dir / "adapter", "--to", "peft", "-o", tmp_path / "p", "-r", "2",
                     "--base", fixtures_dir / "base")  # fmt: skip
    assert result.exit_code == 1 and "plain LoRA" in result.stderr and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_full_rank_bake_reproduces_the_dora_model_in_peft(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    from tests.peft_helpers import logits_through_peft, tokens

    write_dora(tmp_path / "dora", fixtures_dir)
    result = run_cli(
        "convert", tmp_path / "dora", "--to", "peft", "-o", tmp_path / "lora", "--base", fixtures_dir / "base",
        "-r", "32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = tokens()
    dora = logits_through_peft(fixtures_dir / "base", tmp_path / "dora", ids)
    lora = logits_through_peft(fixtures_dir / "base", tmp_path / "lora", ids)
    # rank 32 = min(d, k) for both modules: the bake is exact up to float32 SVD rounding
    torch.testing.assert_close(lora, dora, rtol=1e-4, atol=1e-4)
