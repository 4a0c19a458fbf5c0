"""The ``spectrum`` and ``similarity`` commands: JSON contract, argument forms, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.cli import render
from loratools.io.adapter_dir import save_adapter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide stderr console, so table cells are not elided."""
    monkeypatch.setattr(render.err, "width", 200)


@pytest.fixture
def adapter_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two adapters for the fixtures' q_proj/v_proj: r = 2 inside the top of r = 8 on every A."""
    gen = torch.Generator().manual_seed(7)
    small, big = {}, {}
    for layer in (0, 1):
        for name, out in (("q_proj", 32), ("v_proj", 16)):
            q = torch.linalg.qr(torch.randn(32, 8, generator=gen)).Q  # (in, 8) orthonormal
            a_big = torch.linspace(8, 1, 8)[:, None] * q.T  # (8, in), σ descending
            module = f"model.layers.{layer}.self_attn.{name}"
            big[module] = LoraWeight(a_big, torch.randn(out, 8, generator=gen), 16.0)
            small[module] = LoraWeight(a_big[:2] * 0.5, torch.randn(out, 2, generator=gen), 4.0)
    paths = tmp_path / "r2", tmp_path / "r8"
    save_adapter(Adapter(small, base_model="fixtures/base"), paths[0])
    save_adapter(Adapter(big, base_model="fixtures/base"), paths[1])
    return paths


def test_adapter_json_follows_the_contract(run_cli, fixtures_dir: Path):
    result = run_cli("spectrum", fixtures_dir / "adapter", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["source"] == "adapter" and len(doc["modules"]) == 4
    for module in doc["modules"]:
        assert set(module) >= {"name", "shape", "singular_values", "stable_rank", "effective_rank"}
        s = module["singular_values"]
        assert len(s) == 4 and s == sorted(s, reverse=True) and min(s) > 0
        assert set(module["effective_rank"]) == {"0.9", "0.99"}
        assert module["shape"] in ([32, 32], [16, 32])
        assert 1 <= module["stable_rank"] <= 4
        assert module["energy_at"]["4"] == pytest.approx(1.0)
    assert set(doc["summary"]) == {"by_type", "by_layer", "model"}
    assert set(doc["summary"]["by_type"]) == {"q_proj", "v_proj"}


def test_adapter_spectrum_matches_the_dense_delta(run_cli, fixtures_dir: Path):
    from loratools.io.adapter_dir import load_adapter

    doc = json.loads(run_cli("spectrum", fixtures_dir / "adapter", "--json").stdout)
    adapter = load_adapter(fixtures_dir / "adapter")
    for module in doc["modules"]:
        dense = torch.linalg.svdvals(adapter.delta(module["name"]).double())[:4]
        # float32 factored σ's vs float64 dense svdvals
        torch.testing.assert_close(torch.tensor(module["singular_values"], dtype=torch.float64), dense,
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def test_base_finetuned_recovers_the_planted_spectrum(run_cli, fixtures_dir: Path):
    planted = json.loads((fixtures_dir / "planted.json").read_text())
    result = run_cli("spectrum", fixtures_dir / "base", fixtures_dir / "finetuned", "--json", "--top", "8")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["source"] == "checkpoints"
    assert {m["name"] + ".weight" for m in doc["modules"]} == set(planted["singular_values"])
    for module in doc["modules"]:
        want = planted["singular_values"][module["name"] + ".weight"]
        # the fixtures' noise: noise_std·(√m + √n) moves σ's by ≤ 0.02
        assert module["singular_values"][:4] == pytest.approx(want, abs=0.02)
        assert len(module["singular_values"]) == 8
        assert module["effective_rank"] == {"0.9": 2, "0.99": 4}
    assert doc["summary"]["model"]["uniform_rank"] == {"0.9": 2, "0.99": 4}
    assert sorted(doc["unchanged"]) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_top_beyond_reach_reports_null_not_a_guess(run_cli, fixtures_dir: Path):
    args = ("spectrum", fixtures_dir / "base", fixtures_dir / "finetuned", "--top", "1", "--json")
    doc = json.loads(run_cli(*args, "--include", r"layers\.0\.self_attn\.q_proj").stdout)
    (module,) = doc["modules"]
    assert module["complete"] is False and module["effective_rank"] == {"0.9": None, "0.99": None}
    assert 0.7 < module["energy_at"]["1"] < 0.8  # 0.64 / 0.85 of an exact total


def test_amplification_with_base(run_cli, fixtures_dir: Path, wide):
    result = run_cli("spectrum", fixtures_dir / "adapter", "--base", fixtures_dir / "base")
    assert result.exit_code == 0, result.output
    assert "Amplification" in result.stderr and "0.q_proj" in result.stderr
    doc = json.loads(
        run_cli("spectrum", fixtures_dir / "adapter", "--base", fixtures_dir / "base", "--json").stdout
    )
    amp = doc["modules"][0]["amplification"]
    assert amp["rank"] == 4 and amp["factor"] == pytest.approx(amp["delta_norm"] / amp["projection"])


def test_table_output_on_stderr(run_cli, fixtures_dir: Path, wide):
    result = run_cli("spectrum", fixtures_dir / "base", fixtures_dir / "finetuned", "--top", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert (
        "1.down_proj" in result.stderr and "By module type" in result.stderr and "By layer" in result.stderr
    )
    assert any(ch in result.stderr for ch in render.SPARKS[:3])  # a decaying sparkline
    assert "90%: rank 2 on every module" in result.stderr
    quiet = run_cli("spectrum", fixtures_dir / "adapter", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "expected ADAPTER or BASE FINETUNED, got 0 arguments"),
        (("a", "b", "c"), "expected ADAPTER or BASE FINETUNED, got 3 arguments"),
        (
            ("fixtures/base", "fixtures/finetuned", "--base", "fixtures/base"),
            "--base goes with the ADAPTER form",
        ),
    ],
    ids=["none", "three", "base-with-pair"],
)
def test_argument_count_errors_exit_1_with_one_line(run_cli, args, message):
    """Arguments click parsed but that do not fit together: a LoratoolsError (exit 1), not click's exit 2."""
    result = run_cli("spectrum", *args)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


def test_flags_click_cannot_parse_stay_exit_2(run_cli, fixtures_dir: Path):
    assert run_cli("spectrum", fixtures_dir / "adapter", "--top", "many").exit_code == 2


def test_a_checkpoint_alone_gets_a_clear_error(run_cli, fixtures_dir: Path):
    result = run_cli("spectrum", fixtures_dir / "base")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "BASE FINETUNED" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_base_is_refused(run_cli, fixtures_dir: Path, tmp_path: Path):
    shrunk = Adapter({"model.layers.0.self_attn.q_proj": LoraWeight(torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    save_adapter(shrunk, tmp_path / "bad")
    result = run_cli("spectrum", tmp_path / "bad", "--base", fixtures_dir / "base")
    assert result.exit_code == 1 and "error:" in result.stderr and "q_proj" in result.stderr


def test_plot_is_written_atomically_and_not_replaced_without_force(
    run_cli, fixtures_dir: Path, tmp_path: Path
):
    png = tmp_path / "spectrum.png"
    result = run_cli("spectrum", fixtures_dir / "adapter", "--plot", png, "--quiet")
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC)
    before = png.read_bytes()
    again = run_cli("spectrum", fixtures_dir / "adapter", "--plot", png, "--quiet")
    assert again.exit_code == 1 and "--force" in again.stderr
    assert png.read_bytes() == before
    assert run_cli("spectrum", fixtures_dir / "adapter", "--plot", png, "--force", "-q").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spectrum.png"]  # no temporary left behind


# -- similarity ---------------------------------------------------------------------------------
def test_similarity_json_across_ranks(run_cli, adapter_pair):
    small, big = adapter_pair
    result = run_cli("similarity", small, big, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["side"] == "right" and len(doc["modules"]) == 4
    for module in doc["modules"]:
        phi = torch.tensor(module["phi"])
        assert phi.shape == (2, 8) and module["ranks"] == [2, 8]
        torch.testing.assert_close(phi, torch.ones(2, 8, dtype=phi.dtype), rtol=0, atol=1e-5)  # nested
        assert module["shared_directions"] == 2
    reverse = json.loads(run_cli("similarity", big, small, "--json").stdout)
    assert torch.tensor(reverse["modules"][0]["phi"]).shape == (8, 2)


def test_similarity_with_itself_and_left_side(run_cli, fixtures_dir: Path):
    doc = json.loads(
        run_cli("similarity", fixtures_dir / "adapter", fixtures_dir / "adapter", "--json").stdout
    )
    for module in doc["modules"]:
        # φ(A, A) = 1 up to float64 rounding
        assert module["diagonal"] == pytest.approx([1.0] * 4, abs=1e-9)
    left = run_cli(
        "similarity", fixtures_dir / "adapter", fixtures_dir / "adapter", "--side", "left", "--json"
    )
    assert json.loads(left.stdout)["side"] == "left"


def test_similarity_table_and_plot(run_cli, adapter_pair, tmp_path: Path, wide):
    png = tmp_path / "phi.png"
    result = run_cli("similarity", *adapter_pair, "--plot", png)
    assert result.exit_code == 0, result.output
    assert "0.q_proj" in result.stderr and "Summary" in result.stderr
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_similarity_of_unrelated_adapters_is_an_error(run_cli, fixtures_dir: Path, tmp_path: Path):
    other = Adapter({"encoder.block.0.query": LoraWeight(torch.ones(2, 4), torch.ones(4, 2), 2.0)})
    save_adapter(other, tmp_path / "other")
    result = run_cli("similarity", fixtures_dir / "adapter", tmp_path / "other")
    assert result.exit_code == 1 and "no module in common" in result.stderr


def test_kohya_file_has_the_same_spectrum(run_cli, fixtures_dir: Path, tmp_path: Path):
    kohya = tmp_path / "adapter.safetensors"
    assert run_cli("convert", fixtures_dir / "adapter", "--to", "kohya", "-o", kohya, "-q").exit_code == 0
    peft = json.loads(run_cli("spectrum", fixtures_dir / "adapter", "--json").stdout)
    other = json.loads(run_cli("spectrum", kohya, "--base", fixtures_dir / "base", "--json").stdout)
    assert [m["name"] for m in other["modules"]] == [m["name"] for m in peft["modules"]]
    for a, b in zip(peft["modules"], other["modules"], strict=True):
        # the same factors through peft and kohya: the same float32 math
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-6)


def test_neither_adapter_nor_checkpoint_keeps_the_adapter_error(run_cli, tmp_path: Path):
    result = run_cli("spectrum", tmp_path)
    assert result.exit_code == 1 and "not an adapter folder" in result.stderr
