"""Figures: they render from the JSON documents, and a missing matplotlib is a clear error."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from loratools.errors import MissingExtra
from loratools.ops.similarity import adapter_similarity
from loratools.ops.spectrum import ModuleSpectrum, SpectrumReport
from loratools.plot import _pick_modules, plot_similarity, plot_spectrum, require_matplotlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image(png: bytes):
    from matplotlib.image import imread

    assert png.startswith(PNG_MAGIC)
    return imread(io.BytesIO(png), format="png")


def _spectrum_document() -> dict:
    import torch

    modules = [
        ModuleSpectrum(
            f"model.layers.{layer}.self_attn.{kind}",
            (16, 16),
            torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64) * (layer + 1),
            21.25 * (layer + 1) ** 2,
            complete=True,
        )
        for layer in range(3)
        for kind in ("q_proj", "v_proj")
    ]
    truncated = ModuleSpectrum("lm_head", (64, 16), torch.tensor([1.0], dtype=torch.float64), 10.0, False)
    return SpectrumReport("checkpoints", [*modules, truncated]).to_dict()


def test_spectrum_figure_renders_with_truncated_and_layerless_modules():
    document = _spectrum_document()
    assert document["modules"][-1]["effective_rank"]["0.9"] is None  # drawn as "?"
    image = _image(plot_spectrum(document, "Singular-value spectra of a test"))
    height, width = image.shape[:2]
    assert width > 2 * height > 400  # three panels side by side
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_spectrum_figure_from_a_saved_json_document(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_spectrum_document()))
    assert plot_spectrum(json.loads(path.read_text()), "from JSON").startswith(PNG_MAGIC)


def test_similarity_figure_and_module_choice(fixtures_dir: Path):
    from loratools.io.adapter_dir import load_adapter

    adapter = load_adapter(fixtures_dir / "adapter")
    document = adapter_similarity(adapter, adapter).to_dict()
    image = _image(plot_similarity(document, "φ of the fixture adapter with itself", labels=("a", "b")))
    assert image.shape[1] > image.shape[0]
    many = [{"name": f"model.layers.{i}.{kind}", "ranks": [4, 4]} for i in range(5)
            for kind in ("mlp.up_proj", "self_attn.k_proj", "mlp.down_proj", "self_attn.v_proj", "self_attn.q_proj")]  # fmt: skip
    picked = [m["name"] for m in _pick_modules(many)]
    assert picked[:3] == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
                          "model.layers.2.self_attn.k_proj"]  # fmt: skip
    assert len(picked) == 4


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingExtra, match=r"loratools\[plot\]"):
        require_matplotlib()
    with pytest.raises(MissingExtra, match="--plot"):
        plot_spectrum(_spectrum_document(), "x")


def test_cli_fails_before_the_work_when_matplotlib_is_missing(run_cli, fixtures_dir, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "out.png"
    result = run_cli("spectrum", fixtures_dir / "adapter", "--plot", png, "--json")
    assert result.exit_code == 1 and "pip install 'loratools[plot]'" in result.stderr
    assert result.stdout == "" and not png.exists()
