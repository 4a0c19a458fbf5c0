"""``loratools inspect`` on every fixture, a PEFT-written adapter, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def inspect_json(run_cli, path: Path | str) -> dict:
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_checkpoints(run_cli, fixtures_dir: Path) -> None:
    single = inspect_json(run_cli, fixtures_dir / "base")
    assert single["kind"] == "checkpoint" and single["format"] == "safetensors"
    assert single["tensors"] == 21 and single["parameters"] == 22688 and single["bytes"] == 22688 * 4
    assert single["dtypes"] == {"float32": 21} and single["shards"] == 1
    assert single["config"]["model_type"] == "llama"
    sharded = inspect_json(run_cli, fixtures_dir / "base-sharded")
    assert sharded["format"] == "safetensors-sharded" and sharded["shards"] == 5
    assert sharded["parameters"] == single["parameters"]
    bf16 = inspect_json(run_cli, fixtures_dir / "base-bf16" / "model.safetensors")
    assert bf16["dtypes"] == {"bfloat16": 21} and bf16["bytes"] == 22688 * 2


def test_inspect_adapter(run_cli, fixtures_dir: Path) -> None:
    summary = inspect_json(run_cli, fixtures_dir / "adapter")
    assert summary["kind"] == "adapter" and summary["format"] == "peft"
    assert summary["modules"] == 4 and summary["ranks"] == {"4": 4}
    assert summary["alpha"] == [8.0] and summary["scale"] == [2.0]
    assert summary["target_modules"] == ["q_proj", "v_proj"]
    assert summary["parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)


@pytest.mark.slow
def test_inspect_a_peft_written_adapter(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tests.peft_helpers import load_llama

    config = LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "o_proj"], use_rslora=True)
    get_peft_model(load_llama(fixtures_dir / "base"), config).save_pretrained(tmp_path / "peft")
    summary = inspect_json(run_cli, tmp_path / "peft")
    assert summary["modules"] == 4 and summary["ranks"] == {"8": 4}
    assert summary["use_rslora"] is True
    # alpha/√r through the JSON config: rounding only
    assert summary["scale"] == [pytest.approx(32 / 8**0.5, rel=1e-5)]
    assert summary["target_modules"] == ["k_proj", "o_proj"]


def test_human_table_goes_to_stderr(run_cli, fixtures_dir: Path) -> None:
    result = run_cli("inspect", fixtures_dir / "base")
    assert result.exit_code == 0 and result.stdout == ""
    assert "parameters" in result.stderr and "22688" in result.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.safetensors", "no such file or directory"),
        (
            lambda d: (d / "junk.safetensors").write_bytes(b"\x07" * 64) and d / "junk.safetensors",
            "not a valid",
        ),
        (lambda d: (d / "t.safetensors").write_bytes(b"\x01\x00") and d / "t.safetensors", "8-byte header"),
        (lambda d: "someone/no-such-model@main", "not in the Hub cache while offline"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_1(run_cli, tmp_path: Path, make, message: str) -> None:
    result = run_cli("inspect", make(tmp_path))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_the_installed_command_runs_as_a_subprocess(fixtures_dir: Path) -> None:
    """The real entry point (not CliRunner): exit codes and streams as a shell sees them."""
    ok = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", "inspect", str(fixtures_dir / "adapter"), "--json"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["kind"] == "adapter"
    bad = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", "inspect", str(fixtures_dir / "nope")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stdout == ""
    usage = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", "inspect"], capture_output=True, text=True
    )
    assert usage.returncode == 2


def test_inspect_a_foreign_kohya_file_with_and_without_the_base(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_model_layers_0_self_attn_q_proj"
    tensors = {f"{key}.lora_down.weight": torch.ones(2, 32), f"{key}.lora_up.weight": torch.ones(32, 2)}
    save_file({**tensors, f"{key}.alpha": torch.tensor(4.0)}, tmp_path / "k.safetensors")
    without = json.loads(run_cli("inspect", tmp_path / "k.safetensors", "--json").stdout)
    assert without["label"] == "a kohya LoRA adapter" and without["modules"] == 1
    assert without["scale"] == [2.0] and "--base" in without["module_names"]
    result = run_cli("inspect", tmp_path / "k.safetensors", "--base", fixtures_dir / "base", "--json")
    summary = json.loads(result.stdout)
    assert summary["format"] == "kohya" and summary["modules"] == 1
    assert summary["scale"] == [2.0] and summary["ranks"] == {"2": 1}


def test_quiet_prints_nothing_and_json_still_works(run_cli, fixtures_dir: Path) -> None:
    quiet = run_cli("inspect", fixtures_dir / "adapter", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (
        json.loads(run_cli("inspect", fixtures_dir / "adapter", "-q", "--json").stdout)["kind"] == "adapter"
    )


def test_every_kind_is_named_on_the_first_line(run_cli, fixtures_dir: Path) -> None:
    cases = {
        "adapter": "a PEFT LoRA adapter",
        "base": "a safetensors checkpoint",
        "base-sharded": "a sharded safetensors checkpoint (5 shards)",
    }
    for name, label in cases.items():
        result = run_cli("inspect", fixtures_dir / name)
        assert result.stderr.splitlines()[0] == f"{fixtures_dir / name}: {label}"
