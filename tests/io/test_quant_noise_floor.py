"""spectrum BASE FINETUNED with a quantized base: the rounding noise floor tells a planted low-rank
update from the base's quantization noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.io.checkpoint import open_checkpoint
from tests.io.test_gguf_io import write_gguf_model

pytest.importorskip("gguf")

PLANTED = "model.layers.0.mlp.down_proj.weight"  # (32, 64)


def test_spectrum_reports_the_noise_floor_of_a_q4_base(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q4_0")
    # the fine-tune: the float original plus a rank-2 update whose singular values (≈ 0.5·‖W‖)
    # stand far above Q4_0's rounding (≈ 0.1·|w| per weight, spread over all 32 directions)
    original = open_checkpoint(fixtures_dir / "base")
    tensors = {name: original.get(name) for name in original.names()}
    w = tensors[PLANTED]
    u, v = torch.linalg.qr(torch.randn(32, 2))[0], torch.linalg.qr(torch.randn(64, 2))[0]
    tensors[PLANTED] = w + float(torch.linalg.vector_norm(w)) * 0.5 * (u @ v.T)
    save_file(tensors, tmp_path / "ft.safetensors")
    result = run_cli("spectrum", base, tmp_path / "ft.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    planted = modules[PLANTED.removesuffix(".weight")]
    floor = planted["noise_floor"]
    s = planted["singular_values"]
    assert floor["singular_values_above"] >= 2 and s[1] > 3 * floor["top_singular_value"]
    # past the planted rank ΔW is the base's own rounding: the same size as the floor measured on
    # the fine-tune (random-like rounding of similar weights: within a factor 2)
    assert 0.5 < s[2] / floor["top_singular_value"] < 2
    # an untouched module: ΔW is rounding only, so (almost) nothing stands above the floor
    other = modules["model.layers.1.mlp.down_proj"]
    assert other["noise_floor"]["singular_values_above"] <= 1
    assert 0.5 < other["noise_floor"]["relative_to_delta"] < 2


def test_spectrum_table_shows_the_noise_floor(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q4_0")
    result = run_cli("spectrum", base, fixtures_dir / "base")
    assert result.exit_code == 0, result.stderr
    assert "Rounding noise floor of the quantized base" in result.stderr


def test_extract_reports_the_noise_floor_of_a_q4_base(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    """extract from a Q4_0 base and its float original: ΔW is rounding only, and the report says so
    (the noise's norm is ‖ΔW‖ itself, up to the sampling of two roundings of similar weights)."""
    base = tmp_path / "base.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q4_0")
    result = run_cli("extract", base, fixtures_dir / "base", "-r", "2", "-o", tmp_path / "lora", "--json")
    assert result.exit_code == 0, result.stderr
    modules = json.loads(result.stdout)["modules"]
    assert modules and all(0.5 < m["noise_floor"]["relative_to_delta"] < 2 for m in modules)
    assert all(m["noise_floor"]["singular_values_above"] is None for m in modules)


class _Plain:
    """A checkpoint with ``requantize`` whose tensors are not quantized (a plain safetensors base)."""

    def requantizes(self, name: str) -> bool:
        return False

    def requantize(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        raise AssertionError("asked to requantize a tensor it says it does not quantize")


class _NoFloat(torch.Tensor):
    """A tensor that refuses to be copied to float32: the floor of a plain base must not make one."""

    def to(self, *args, **kwargs):  # type: ignore[override]
        raise AssertionError("a float32 copy of the fine-tune's weight was made")


def test_no_floor_and_no_float32_copy_for_a_base_that_quantizes_nothing(fixtures_dir: Path) -> None:
    from loratools.ops.spectrum.noise import noise_floor

    w = torch.randn(8, 4).as_subclass(_NoFloat)
    assert noise_floor(_Plain(), _Plain(), PLANTED, w, None, 1.0) is None
    ckpt = open_checkpoint(fixtures_dir / "base")  # a real plain checkpoint says so too
    assert not ckpt.requantizes(PLANTED) and noise_floor(ckpt, ckpt, PLANTED, w, None, 1.0) is None
