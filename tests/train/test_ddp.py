"""torchrun: 2 CPU processes (gloo) take the same steps as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratools.io.adapter_dir import load_adapter
from loratools.train.ddp import Workers, all_reduce_sum, init_distributed, wrap_model
from loratools.train.run import TrainOptions, checkpoint_dir, train_adapter

COMMON = {"steps": 6, "lr": 1e-2, "seq_len": 32, "rank": 4, "eval_every": 3, "seed": 5}


def test_without_torchrun_it_is_one_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == Workers(0, 1, 0, torch.device("cpu")) and info.is_main and not info.distributed
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, info) is model
    assert all_reduce_sum([1.5, 2.0], info) == [1.5, 2.0]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(fixtures_dir: Path, tmp_path: Path) -> None:
    data = fixtures_dir / "train" / "ids.jsonl"
    single = train_adapter(
        fixtures_dir / "base", data, tmp_path / "one", TrainOptions(**COMMON, batch_size=4, device="cpu")
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()] + ["--batch-size=1", "--grad-accum=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "loratools.cli.main", "train", str(fixtures_dir / "base"), "--data", str(data)]
    command += ["-o", str(tmp_path / "two"), "--device=cpu", "--save-every=3", "--json", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # only rank 0 prints
    assert report["world_size"] == 2

    # two ranks all-reduce: float32 sums in another order
    torch.testing.assert_close(report["losses"], single.losses, rtol=1e-5, atol=1e-6)
    evals = {int(k): v for k, v in report["eval_losses"].items()}
    assert evals.keys() == single.eval_losses.keys() == {3, 6}
    # two ranks all-reduce: float32 sums in another order
    torch.testing.assert_close(list(evals.values()), list(single.eval_losses.values()), rtol=1e-5, atol=1e-6)
    one, two = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    for name, weight in one.weights.items():
        # AdamW steps amplify those differences
        torch.testing.assert_close(two.weights[name].delta(), weight.delta(), rtol=1e-4, atol=1e-6)
    assert two.provenance["world_size"] == 2
    assert (
        checkpoint_dir(tmp_path / "two") / "step-000003" / "trainer_state.pt"
    ).is_file()  # rank 0 wrote it
