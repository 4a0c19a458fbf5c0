"""``loratools merge | unmerge | swap``: JSON shape, round trips, warnings, and every refusal (exit 1, no output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import save_adapter
from loratools.io.checkpoint import open_checkpoint
from tests.tolerances import EPS

Q0 = "model.layers.0.self_attn.q_proj"


def read_all(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.names()}


def make_adapter(
    folder: Path, modules: dict[str, tuple[int, int]], seed: int = 0, scale: float = 0.1
) -> Path:
    """A PEFT adapter folder with N(0, scale²) factors, rank 4, alpha 8, for modules name → (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        m: LoraWeight(torch.randn(4, k, generator=gen) * scale, torch.randn(d, 4, generator=gen) * scale, 8.0)
        for m, (d, k) in modules.items()
    }
    save_adapter(Adapter(weights, base_model="fixtures/base"), folder)
    return folder


def ok_json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr


def test_merge_json_shape(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = ok_json(run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", out, "--json"))
    assert report["output"] == str(out) and report["operation"] == "merge"
    assert report["merged"] == 4 and report["copied"] == 17 and report["replaced"] == []
    assert report["adapters"][0]["weight"] == 1.0 and report["adapters"][0]["modules"] == 4
    assert {m["name"] for m in report["modules"]} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    precision = report["precision"]
    # float32 keeps the update: only rounding is lost
    assert 0.1 < precision["relative_delta"] < 0.5 and precision["lost_fraction"] < 1e-5
    assert precision["effect_vanishes"] is False and report["warnings"] == []
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_weights_unmerge_and_swap_round_trip(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base, adapter = fixtures_dir / "base", fixtures_dir / "adapter"
    other = make_adapter(tmp_path / "other", {Q0: (32, 32)}, seed=3)
    assert (
        run_cli("merge", base, adapter, other, "-w", "0.5", "-w", "2", "-o", tmp_path / "m", "-q").exit_code
        == 0
    )
    swap = ok_json(
        run_cli(
            "swap", tmp_path / "m", "--remove", other, "--remove-weight", "2", "--add", other,
            "--add-weight", "-1", "-o", tmp_path / "s", "--json",
        )
    )  # fmt: skip
    assert swap["operation"] == "swap" and [a["weight"] for a in swap["adapters"]] == [-1.0, -2.0]
    result = run_cli("unmerge", tmp_path / "s", adapter, other, "-w", "0.5", "-w", "-1", "-o", tmp_path / "u")
    assert result.exit_code == 0, result.stderr
    original, restored = read_all(base), read_all(tmp_path / "u")
    for name, w0 in original.items():
        # three float32 roundings of values near |W0| + the deltas (each ≤ 0.3·|W0|ish): a few ulps
        torch.testing.assert_close(restored[name], w0, rtol=8 * EPS[torch.float32], atol=1e-6)


def test_bf16_vanishing_update_warns_and_suggests_float32(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    tiny = make_adapter(tmp_path / "tiny", {Q0: (32, 32)}, scale=1e-3)  # ‖Δ‖/‖W0‖ ≈ 1e-5
    result = run_cli("merge", fixtures_dir / "base-bf16", tiny, "-o", tmp_path / "o", "--json")
    report = ok_json(result)
    assert report["precision"]["effect_vanishes"] is True and report["precision"]["lost_fraction"] > 0.5
    assert "--dtype float32" in result.stderr and any("--dtype float32" in w for w in report["warnings"])
    kept = ok_json(
        run_cli(
            "merge", fixtures_dir / "base-bf16", tiny, "-o", tmp_path / "f", "--dtype", "float32", "--json"
        )
    )
    # float32 keeps it: what is left is float32's own rounding, 2⁻²⁴·‖W0‖/‖Δ‖ ≈ 6e-3 at most
    assert kept["precision"]["lost_fraction"] < 1e-2 and kept["dtype"] == "float32"
    assert read_all(tmp_path / "f")[f"{Q0}.weight"].dtype == torch.float32


def test_table_and_summary_on_stderr(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli("merge", fixtures_dir / "base-sharded", fixtures_dir / "adapter", "-o", tmp_path / "o")
    assert result.exit_code == 0 and result.stdout == ""
    assert "‖Δ‖/‖W0‖" in result.stderr and "4 updated, 0 replaced, 17 copied" in result.stderr
    assert "made for base model 'fixtures/base'" in result.stderr  # a warning, not a refusal
    quiet = run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", tmp_path / "q", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_refuses_adapters_that_do_not_fit(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    wrong = make_adapter(tmp_path / "wrong", {Q0: (16, 32), "model.layers.5.mlp.up_proj": (64, 32)})
    result = run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", wrong, "-o", tmp_path / "out")
    refused(
        result, "2 problem(s)", "model.layers.5.mlp.up_proj.weight matches no base tensor", "[16, 32] update"
    )
    assert not (tmp_path / "out").exists()


def test_refuses_to_remove_a_replaced_module(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    save_adapter(Adapter({}, saved_modules={"lm_head.weight": torch.zeros(64, 32)}), tmp_path / "head")
    refused(
        run_cli("unmerge", fixtures_dir / "base", tmp_path / "head", "-o", tmp_path / "u"), "cannot restore"
    )
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["merge", "{base}", "{adapter}", "-o", "{base}/x"], "overlaps the input"),
        (["merge", "{base}", "{adapter}", "-o", "{adapter}"], "overlaps the input"),
        (["merge", "{tmp}/missing", "{adapter}", "-o", "{tmp}/o"], "no such file or directory"),
        (["merge", "{base}", "{tmp}/missing", "-o", "{tmp}/o"], "no such file or directory"),
        (["merge", "{base}", "{base}", "-o", "{tmp}/o"], "not an adapter folder"),
        (["swap", "{base}", "--remove", "{adapter}", "--add", "{tmp}/missing", "-o", "{tmp}/o"], "missing"),
        (["merge", "{base}", "{adapter}", "-o", "{tmp}/o", "--device", "cuda:99"], "--device"),
    ],
)
def test_refusals_exit_1_and_write_nothing(run_cli, fixture_copy, tmp_path: Path, args, fragment) -> None:
    names = {"base": fixture_copy("base"), "adapter": fixture_copy("adapter"), "tmp": tmp_path}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    refused(run_cli(*(a.format(**names) for a in args)), fragment)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_existing_output_needs_force(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    args = ["merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", tmp_path / "o"]
    refused(run_cli(*args), "already exists", "--force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert run_cli(*args, "--force", "-q").exit_code == 0
    assert not (tmp_path / "o" / "keep.txt").exists() and (tmp_path / "o" / "model.safetensors").is_file()


def test_weight_count_must_match_adapters(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "merge", fixtures_dir / "base", fixtures_dir / "adapter", "-w", "1", "-w", "2", "-o", tmp_path / "o"
    )
    assert (
        result.exit_code == 1
        and result.stderr.startswith("error: ")
        and "give one per adapter" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_device_cuda(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base, adapter = fixtures_dir / "base-bf16", fixtures_dir / "adapter"
    gpu = ok_json(run_cli("merge", base, adapter, "-o", tmp_path / "g", "--device", "cuda", "--json"))
    assert run_cli("merge", base, adapter, "-o", tmp_path / "c", "--device", "cpu", "-q").exit_code == 0
    assert gpu["merged"] == 4
    cpu_out, gpu_out = read_all(tmp_path / "c"), read_all(tmp_path / "g")
    for name, tensor in cpu_out.items():
        assert gpu_out[name].dtype == torch.bfloat16
        torch.testing.assert_close(gpu_out[name], tensor, atol=0, rtol=EPS[torch.bfloat16])  # ≤ 1 ulp apart
