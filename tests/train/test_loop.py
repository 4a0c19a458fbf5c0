"""The loop: it learns, accumulation is exact, only LoRA trains, resume continues the same curve; the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.errors import LoratoolsError
from loratools.io.adapter_dir import load_adapter
from loratools.train.data import Packed, pack, read_examples, split_examples
from loratools.train.ddp import Workers
from loratools.train.inject import inject_lora, lora_layers
from loratools.train.loop import LoopOptions, batch_rows, evaluate, fit, lr_at
from loratools.train.model import LlamaForCausalLM, load_model
from loratools.train.run import TrainOptions, checkpoint_dir, train_adapter

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: thread hand-offs cost more than the math (and the CI box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def counting(fixtures_dir: Path) -> tuple[Packed, Packed]:
    examples = read_examples(fixtures_dir / "train" / "ids.jsonl")
    train, held = split_examples(examples, 0.1, seed=0)
    return pack(train, 64), pack(held, 64)


def _model(fixtures_dir: Path, targets: list[str], rank: int = 8) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = load_model(fixtures_dir / "base")
    inject_lora(model, targets, rank, 2 * rank)
    return model


def test_the_fixture_model_learns_the_counting_task(fixtures_dir: Path, counting) -> None:
    train, held = counting
    model = _model(fixtures_dir, ALL_LINEAR)
    start = evaluate(model, held, 8, Workers())
    result = fit(model, train, held, LoopOptions(steps=40, lr=3e-2, batch_size=8, eval_every=20))
    assert start > 4.0  # ≈ ln(64): the random model knows nothing
    assert result.eval_losses[40] < 0.4 * start
    assert result.eval_losses[40] <= result.eval_losses[20] + 0.05  # eval noise of the small held-out set
    assert result.tokens == 40 * 8 * 64 and result.tokens_per_s > 0


def test_only_lora_factors_change(fixtures_dir: Path, counting) -> None:
    model = _model(fixtures_dir, ["q_proj", "v_proj"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    fit(model, counting[0], None, LoopOptions(steps=3, lr=1e-2, batch_size=4))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in lora_layers(model).values())


def test_gradient_accumulation_takes_the_same_steps(fixtures_dir: Path, counting) -> None:
    runs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        model = _model(fixtures_dir, ["q_proj", "v_proj"], rank=4)
        result = fit(
            model, counting[0], None, LoopOptions(steps=4, lr=1e-2, batch_size=batch, grad_accum=accum)
        )
        runs.append(
            (result.losses, torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
        )
    for losses, factors in runs[1:]:
        # the same steps with batches split another way: float32 gradient sums in another order
        torch.testing.assert_close(losses, runs[0][0], rtol=1e-5, atol=1e-6)
        # AdamW over several steps amplifies the first differences
        torch.testing.assert_close(factors, runs[0][1], rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(2, 300), warmup=st.integers(0, 20), lr=st.floats(1e-5, 1.0), floor=st.floats(0, 0.5))
def test_schedule_warms_up_then_decays_to_the_floor(steps: int, warmup: int, lr: float, floor: float) -> None:
    opts = LoopOptions(steps=steps, lr=lr, warmup_steps=min(warmup, steps - 1), min_lr_ratio=floor)
    rates = [lr_at(s, opts) for s in range(steps + 1)]
    peak = opts.warmup
    # float64 rounding of the schedule
    assert all(a <= b * (1 + 1e-9) for a, b in pairwise(rates[: peak + 1]))
    assert all(a >= b * (1 - 1e-9) for a, b in pairwise(rates[peak:]))  # float64 rounding of the schedule
    assert max(rates) == pytest.approx(lr)
    assert rates[steps] == pytest.approx(lr * floor, abs=1e-12)  # float64 rounding


def test_batches_cover_each_row_once_per_epoch() -> None:
    rows = torch.cat([batch_rows(step, 5, 20, seed=3) for step in range(4)])  # 4 × 5 = one epoch
    assert sorted(rows.tolist()) == list(range(20))
    assert torch.equal(batch_rows(2, 5, 20, seed=3), batch_rows(2, 5, 20, seed=3))
    assert not torch.equal(batch_rows(0, 20, 20, seed=3), batch_rows(0, 20, 20, seed=4))


def test_resume_continues_the_same_loss_curve(fixtures_dir: Path, tmp_path: Path) -> None:
    opts = TrainOptions(steps=12, lr=1e-2, seq_len=32, batch_size=2, dropout=0.1, save_every=6, device="cpu")
    data = fixtures_dir / "train" / "ids.jsonl"
    whole = train_adapter(fixtures_dir / "base", data, tmp_path / "whole", opts)
    checkpoint = checkpoint_dir(tmp_path / "whole") / "step-000006"
    assert (checkpoint / "trainer_state.pt").is_file()
    resumed = train_adapter(fixtures_dir / "base", data, tmp_path / "resumed", opts, resume=checkpoint)
    assert resumed.losses == whole.losses  # bit-identical: data order, dropout RNG and Adam state restored
    assert resumed.eval_losses == whole.eval_losses
    a, b = load_adapter(tmp_path / "whole"), load_adapter(tmp_path / "resumed")
    for name, weight in a.weights.items():
        assert torch.equal(weight.a, b.weights[name].a) and torch.equal(weight.b, b.weights[name].b)
    assert b.provenance["resumed_from"] == str(checkpoint)


def test_continue_training_from_an_adapter(fixtures_dir: Path, tmp_path: Path) -> None:
    opts = TrainOptions(steps=3, lr=1e-2, seq_len=32, rank=3, targets=("k_proj",), device="cpu")
    data = fixtures_dir / "train" / "ids.jsonl"
    first = train_adapter(fixtures_dir / "base", data, tmp_path / "one", opts)
    second = train_adapter(fixtures_dir / "base", data, tmp_path / "two", opts, init_adapter=tmp_path / "one")
    assert second.modules == first.modules and all(m.endswith("k_proj") for m in second.modules)
    assert second.losses[0] < first.losses[0]  # it starts from the trained factors, not from B = 0
    assert load_adapter(tmp_path / "two").ranks == dict.fromkeys(first.modules, 3)


def test_cli_trains_and_records_provenance(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["train", fixtures_dir / "base", "--data", fixtures_dir / "train" / "count.txt", "-o", out]
    args += ["--tokenizer", fixtures_dir / "train" / "tokenizer.json", "--steps", "4", "--seq-len", "32"]
    result = run_cli(*args, "-r", "2", "--targets", "q_proj,o_proj", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["losses"]) == 4 and report["eval_loss"] > 0
    assert report["modules"] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")
    ]
    adapter = load_adapter(out)
    assert adapter.ranks == dict.fromkeys(report["modules"], 2)
    assert adapter.provenance["method"] == "train" and adapter.provenance["rank"] == 2
    assert adapter.provenance["min_lr_ratio"] == 0.0  # the default, read by click from TrainOptions
    assert adapter.provenance["targets"] == ["q_proj", "o_proj"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "o_proj"]

    again = run_cli(*args, "--device", "cpu")
    assert again.exit_code == 1 and "already exists" in again.stderr and "Traceback" not in again.output


def test_train_options_hand_every_loop_option_to_the_loop() -> None:
    """TrainOptions inherits LoopOptions' fields (one definition), so none is dropped on the way."""
    from dataclasses import fields

    values = dict(steps=7, lr=1e-3, weight_decay=0.1, warmup_steps=2, min_lr_ratio=0.25, batch_size=3,
                  grad_accum=2, max_grad_norm=0.5, eval_every=3, save_every=4, seed=9, autocast_bf16=True)  # fmt: skip
    assert set(values) == {f.name for f in fields(LoopOptions)}  # a new loop option: add it here too
    assert TrainOptions(**values).loop_options() == LoopOptions(**values)
    assert TrainOptions().loop_options(autocast_bf16=True).autocast_bf16


def test_cli_sets_min_lr_ratio(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["train", fixtures_dir / "base", "--data", fixtures_dir / "train" / "ids.jsonl", "-o", out]
    result = run_cli(*args, "--steps", "2", "--seq-len", "32", "--min-lr-ratio", "0.5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert load_adapter(out).provenance["min_lr_ratio"] == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-lr-ratio", "2"], "min_lr_ratio must be in [0, 1]"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--dropout", "1.5"], "--dropout must be in"),
        (["--targets", "qkv"], "matches no linear layer"),
    ],
)
def test_cli_refuses_bad_options(run_cli, fixtures_dir: Path, tmp_path: Path, flags: list[str], message: str):
    data = fixtures_dir / "train" / "ids.jsonl"
    result = run_cli(
        "train", fixtures_dir / "base", "--data", data, "-o", tmp_path / "o", "--device", "cpu", *flags
    )
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_an_output_inside_the_model_folder_is_refused(fixture_copy, fixtures_dir: Path) -> None:
    model = fixture_copy("base")
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(LoratoolsError, match="overlaps the input"):
        train_adapter(
            model, fixtures_dir / "train" / "ids.jsonl", model / "adapter", TrainOptions(device="cpu")
        )
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.gpu
def test_cuda_bf16_autocast_learns(fixtures_dir: Path, counting) -> None:
    train, held = counting
    model = _model(fixtures_dir, ALL_LINEAR).cuda()
    info = Workers(device=torch.device("cuda"))
    start = evaluate(model, held, 8, info, bf16=True)
    opts = LoopOptions(steps=40, lr=3e-2, batch_size=8, autocast_bf16=True)
    result = fit(model, train, held, opts, info=info)
    assert result.eval_losses[40] < 0.5 * start


@pytest.mark.gpu
def test_cuda_bf16_base_trains_float32_factors(fixtures_dir: Path, tmp_path: Path) -> None:
    opts = TrainOptions(steps=5, lr=1e-2, seq_len=32, device="cuda", dtype="bfloat16")
    report = train_adapter(fixtures_dir / "base", fixtures_dir / "train" / "ids.jsonl", tmp_path / "a", opts)
    assert report.losses[-1] < report.losses[0] + 0.1
    adapter = load_adapter(tmp_path / "a")
    assert {w.a.dtype for w in adapter.weights.values()} == {torch.float32}
