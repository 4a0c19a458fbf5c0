"""``spectrum --geometry / --intruders``: the JSON shape scripts rely on, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pair_json_has_the_documented_keys_per_module(run_cli, fixtures_dir: Path) -> None:
    result = run_cli(
        "spectrum", fixtures_dir / "base", fixtures_dir / "finetuned",
        "--geometry", "--intruders", "--intruder-k", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    module = doc["modules"][0]
    assert set(module["intruders"]) >= {"k", "epsilon", "similarities", "count"}
    assert module["intruders"]["k"] == 3 and module["intruders"]["epsilon"] == 0.5
    assert len(module["intruders"]["similarities"]) == 3
    assert set(module["magnitude_direction"]) == {"delta_m", "delta_d"}
    assert module["magnitude_direction"]["delta_m"] > 0  # the fixture fine-tune changed every module
    assert set(module["rotation"]) >= {"k", "sigma_change", "alignment"}
    assert -1.0 <= doc["direction_magnitude_correlation"] <= 1.0


def test_plain_spectrum_stays_without_geometry(run_cli, fixtures_dir: Path) -> None:
    result = run_cli("spectrum", fixtures_dir / "base", fixtures_dir / "finetuned", "--json")
    doc = json.loads(result.stdout)
    assert not {"intruders", "rotation", "magnitude_direction"} & set(doc["modules"][0])
    assert "direction_magnitude_correlation" not in doc


def test_geometry_plot_and_table(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "geometry.png"
    result = run_cli(
        "spectrum", fixtures_dir / "base", fixtures_dir / "finetuned",
        "--geometry", "--intruders", "--intruder-k", "2", "--geometry-plot", plot,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert "What fine-tuning did" in result.stderr
    assert "correlation of ΔD with ΔM" in result.stderr


def test_adapter_geometry_needs_the_base(run_cli, fixtures_dir: Path) -> None:
    result = run_cli("spectrum", fixtures_dir / "adapter", "--geometry")
    assert result.exit_code == 1
    assert "--base" in result.stderr
    with_base = run_cli(
        "spectrum", fixtures_dir / "adapter", "--base", fixtures_dir / "base", "--geometry", "--json"
    )
    assert with_base.exit_code == 0, with_base.output
    assert "rotation" in json.loads(with_base.stdout)["modules"][0]


def test_geometry_plot_without_a_measure_is_a_clear_error(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "spectrum", fixtures_dir / "base", fixtures_dir / "finetuned", "--geometry-plot", tmp_path / "g.png"
    )
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "--geometry-plot" in result.stderr
    assert not (tmp_path / "g.png").exists()


def test_bad_epsilon_is_an_error(run_cli, fixtures_dir: Path) -> None:
    result = run_cli(
        "spectrum",
        fixtures_dir / "base",
        fixtures_dir / "finetuned",
        "--intruders",
        "--intruder-epsilon",
        "2",
    )
    assert result.exit_code == 1
    assert "--intruder-epsilon" in result.stderr


def test_help_shows_the_options_defaults() -> None:
    """spectrum reads its defaults from the options dataclass lazily (no torch on --help); the
    values its help shows must be those defaults."""
    from loratools.cli.spectrum import spectrum

    lazy = [p for p in spectrum.params if callable(p.default)]
    assert {p.name for p in lazy} == {"top", "intruder_k", "intruder_epsilon"}
    for param in lazy:
        assert param.show_default == str(param.default()), param.name
