"""Option values out of range are a clear error (exit 1, one ``error:`` line, nothing written) in
every command; exit 2 is left to flags click itself cannot parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratools.errors import InvalidOptions
from loratools.train.loop import LoopOptions


def refused(result, fragment: str) -> None:
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr and result.stdout == ""


@pytest.mark.parametrize("energy", ["1.5", "0", "nan", "-0.1"])
def test_energy_out_of_range_exits_1_in_extract_and_resize(
    run_cli, fixtures_dir: Path, tmp_path: Path, energy
) -> None:
    out = tmp_path / "o"
    refused(
        run_cli("extract", fixtures_dir / "base", fixtures_dir / "finetuned", "--energy", energy, "-o", out),
        "--energy",
    )
    refused(run_cli("resize", fixtures_dir / "adapter", "--energy", energy, "-o", out), "--energy")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["resize", "{adapter}", "-r", "0", "-o", "{out}"], "-r/--rank must be at least 1 (got 0)"),
        (["resize", "{adapter}", "--budget", "0", "-o", "{out}"], "--budget must be at least 1 (got 0)"),
        (["resize", "{adapter}", "-r", "2", "--energy", "0.5", "-o", "{out}"], "exactly one"),
        (
            [
                "combine",
                "{adapter}",
                "{adapter}",
                "--method",
                "dare",
                "-r",
                "2",
                "--density",
                "2",
                "-o",
                "{out}",
            ],
            "density",
        ),
        (["extract", "{base}", "{finetuned}", "-r", "2", "--alpha", "inf", "-o", "{out}"], "--alpha"),
    ],
)
def test_bad_option_values_exit_1(run_cli, fixtures_dir: Path, tmp_path: Path, args, fragment) -> None:
    names = {k: fixtures_dir / k for k in ("adapter", "base", "finetuned")} | {"out": tmp_path / "o"}
    refused(run_cli(*(a.format(**names) for a in args)), fragment)
    assert not (tmp_path / "o").exists()


def test_click_parse_errors_stay_usage_errors(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    result = run_cli("resize", fixtures_dir / "adapter", "--energy", "lots", "-o", tmp_path / "o")
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"steps": 0}, r"--steps must be at least 1 \(got 0\)"),
        ({"lr": float("nan")}, r"--lr must be a positive number \(got nan\)"),
        ({"lr": 0.0}, "--lr must be a positive"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"warmup_steps": -1}, "--warmup"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"max_grad_norm": -1.0}, "--max-grad-norm"),
    ],
)
def test_training_loop_options_are_loratools_errors(kwargs, fragment) -> None:
    with pytest.raises(InvalidOptions, match=fragment):
        LoopOptions(**kwargs)


def test_an_internal_error_is_one_line_that_calls_itself_a_bug(monkeypatch, capsys) -> None:
    """Bad input never gets here (it raises a LoratoolsError); what does is reported as a bug."""
    import loratools.cli.main as entry

    def broken(**_: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(entry, "cli", broken)
    monkeypatch.setattr("sys.argv", ["loratools", "inspect", "x"])
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: internal error (ValueError: boom); this is a bug in loratools")
    assert err.count("\n") == 1 and "unexpected" not in err
