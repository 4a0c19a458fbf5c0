"""extract says what it did with ranks no LoRA should have, and why nothing could be extracted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.errors import name_summary
from loratools.io.adapter_dir import load_adapter


def test_rank_above_min_d_k_is_capped_and_said(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "1000", "-o", tmp_path / "a"
    )
    assert result.exit_code == 0, result.stderr
    assert (
        "warning: -r 1000 is more than 14 module(s) can hold; their rank is capped at min(d, k)"
        in result.stderr
    )
    assert "model.layers.0.self_attn.k_proj 16×32 → 16" in result.stderr
    assert "no smaller than their dense weight, r·(d+k) ≥ d·k" in result.stderr
    adapter = load_adapter(tmp_path / "a")
    assert all(w.rank == min(w.shape) for w in adapter.weights.values())


def test_a_sensible_rank_warns_about_nothing(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "4", "-o", tmp_path / "a"
    )
    assert result.exit_code == 0 and "warning" not in result.stderr


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unrelated_models_say_that_no_2d_weight_is_shared(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "bert.safetensors"
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"]
    save_file({n: torch.zeros(8, 8) for n in names} | {"pooler.dense.bias": torch.zeros(8)}, other)
    result = run_cli("extract", fixtures_dir / "base", other, "-r", "2", "-o", tmp_path / "o")
    refused(
        result,
        "share no 2-D weight",
        "the fine-tune 2 tensors (encoder.layer.0.attention.self.…: key.weight, query.weight)",
        "is the second checkpoint a fine-tune of the first?",
    )
    assert "None" not in result.stderr and not (tmp_path / "o").exists()


def test_targets_that_match_nothing_name_the_targets(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "extract",
        fixtures_dir / "base",
        fixtures_dir / "finetuned",
        "-r",
        "2",
        "--targets",
        "foo,bar",
        "-o",
        tmp_path / "o",
    )
    refused(result, "--targets foo,bar selects no 2-D weight: none of the 16 shared 2-D weights")
    assert not (tmp_path / "o").exists()


def test_name_summary_says_the_common_prefix_once() -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)]
    assert (
        name_summary(names)
        == "12 tensors (model.layers.…: 0.mlp.up_proj.weight, 1.mlp.up_proj.weight, 2.mlp.up_proj.weight, …)"
    )
    assert name_summary(["a.weight"]) == "1 tensor (a.weight)"
    assert name_summary([]) == "no tensors"


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter.GGUF", "adapter.bin"])
def test_a_file_name_for_the_adapter_folder_is_refused_before_the_work(
    run_cli, fixtures_dir: Path, tmp_path: Path, name: str
) -> None:
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "2", "-o", tmp_path / name
    )
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "folder" in result.stderr
    assert not (tmp_path / name).exists()


def test_pull_into_a_file_name_is_refused(run_cli, tmp_path: Path) -> None:
    result = run_cli("pull", "org/name", "-o", tmp_path / "model.safetensors")
    assert result.exit_code == 1 and "pull writes a folder" in result.stderr
    assert not (tmp_path / "model.safetensors").exists()
