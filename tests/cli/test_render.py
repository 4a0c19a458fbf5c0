"""Tables and figures that never hide what matters (issue 12 §5): no cut names or numbers at 80
columns, --plot names that get a suffix, φ heatmaps scaled to their data."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from loratools.cli import render

PREFIX = "base_model.model.model.layers."


def rendered(monkeypatch: pytest.MonkeyPatch, columns: list[str], rows: list[tuple], width: int = 80) -> str:
    """The table as an 80-column log file would hold it."""
    out = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=out, width=width, highlight=False, color_system=None))
    render.table("spectrum", columns, rows)
    return out.getvalue()


def test_names_and_numbers_survive_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        (f"{PREFIX}{i}.self_attn.q_proj", "4096×4096", 1.234e-9 * (i + 1), 12.5, 7, 0.9991, "▁▂▃▄▅▆▇█" * 3)
        for i in range(12)
    ]
    text = rendered(monkeypatch, ["module", "shape", "σ₁", "stable rank", "r@90%", "e(1)", "σᵢ/σ₁"], rows)
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert f"common prefix {PREFIX}" in text.replace("\n", " ").replace("  ", " ")
    for i in range(12):
        assert f"{i}.self_attn.q_proj" in text
        assert f"{1.234e-9 * (i + 1):.4g}" in text  # 1.234e-09: significant digits kept


def test_columns_that_do_not_fit_continue_in_a_second_table(monkeypatch: pytest.MonkeyPatch) -> None:
    columns = ["module", *(f"energy at rank {r}" for r in range(10))]
    rows = [("layers.0.mlp.down_proj", *(0.1 * r for r in range(10)))]
    text = rendered(monkeypatch, columns, rows)
    assert "…" not in text and "(continued)" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    numbers = re.findall(r"\b0\.\d+\b|\b0\b", text)
    assert len(numbers) >= 10
    assert text.count("layers.0.mlp.down_proj") >= 2  # the row label is repeated in each part


def test_common_prefix_ends_at_a_dot() -> None:
    assert render.common_prefix(["a.b.c1", "a.b.c2"]) == "a.b."
    assert render.common_prefix(["a.bc", "a.bd"]) == "a."
    assert render.common_prefix(["only.one"]) == ""
    assert render.common_prefix(["lora_unet_down_0_q", "lora_unet_down_1_q"]) == "lora_unet_down_"


def test_plot_without_suffix_gets_png(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_cli("spectrum", fixtures_dir / "adapter", "--plot", tmp_path / "spectra", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "spectra.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (tmp_path / "spectra").exists()


def test_plot_with_another_suffix_is_refused_before_the_work(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    result = run_cli(
        "similarity", fixtures_dir / "adapter", fixtures_dir / "adapter", "--plot", tmp_path / "phi.pdf"
    )
    assert result.exit_code == 1 and "PNG" in result.stderr and ".png" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_phi_heatmap_colours_span_the_data_and_name_the_module() -> None:
    pytest.importorskip("matplotlib")
    from loratools.plot import _figure, _phi_panel

    figure = _figure(4, 4)
    ax = figure.subplots()
    phi = [[0.02, 0.05], [0.08, 0.15]]  # real adapters: φ far below 1
    _phi_panel(ax, phi, ("a", "b"), "model.layers.7.self_attn.q_proj")
    assert ax.images[0].get_clim() == pytest.approx((0.02, 0.15))
    assert "model.layers.7.self_attn.q_proj" in ax.get_title()
    colorbar_label = figure.axes[-1].get_ylabel()
    assert "0.02" in colorbar_label and "0.15" in colorbar_label
