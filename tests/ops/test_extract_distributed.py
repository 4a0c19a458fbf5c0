"""``loratools extract`` under torchrun with 2 CPU processes (gloo) equals the single-process result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.io.adapter_dir import load_adapter

pytestmark = pytest.mark.slow


def torchrun_extract(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "loratools.cli.main", "extract", *map(str, args)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def assert_same_adapter(a: Path, b: Path) -> None:
    one, two = load_adapter(a), load_adapter(b)
    assert one.ranks == two.ranks
    assert list(one.weights) == list(two.weights)  # same module order: rank 0 restores checkpoint order
    for module in one.weights:
        assert one.weights[module].alpha == two.weights[module].alpha
        # two processes, the same float32 math: only summation order differs
        torch.testing.assert_close(one.delta(module), two.delta(module), rtol=1e-5, atol=1e-7)
    assert list(one.saved_modules) == list(two.saved_modules)
    for name, tensor in one.saved_modules.items():
        assert torch.equal(tensor, two.saved_modules[name])
    config_one = json.loads((a / "adapter_config.json").read_text())
    config_two = json.loads((b / "adapter_config.json").read_text())
    assert config_one == config_two


@pytest.mark.parametrize("flags", [("-r", "4"), ("--budget", "30", "--modules-to-save")])
def test_two_processes_write_the_single_process_adapter(run_cli, fixtures_dir, tmp_path, flags):
    ft = tmp_path / "ft"
    shutil.copytree(fixtures_dir / "finetuned", ft)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.1.input_layernorm.weight"] *= 1.25  # a changed norm, carried with --modules-to-save
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    single = run_cli("extract", fixtures_dir / "base", ft, "-o", tmp_path / "single", "--json", *flags)
    assert single.exit_code == 0, single.output
    run = torchrun_extract(tmp_path, fixtures_dir / "base", ft, "-o", tmp_path / "double", "--json", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["output"] == str(tmp_path / "double")  # one JSON document, from rank 0
    assert_same_adapter(tmp_path / "single", tmp_path / "double")


def test_an_error_on_one_process_stops_both_without_output(fixtures_dir, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(fixtures_dir / "finetuned", ft)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    run = torchrun_extract(tmp_path, fixtures_dir / "base", ft, "-r", "2", "-o", tmp_path / "out")
    assert run.returncode != 0
    assert (
        "error: the difference of tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf" in run.stderr
    )
    assert not (tmp_path / "out").exists()
