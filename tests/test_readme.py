"""The README's commands are true: the quick start runs, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(b for b in bash_blocks() if "pytest" in b).strip()
    after_venv = " && ".join(test_command.split(" && ")[2:])  # CI makes and activates its own venv
    assert after_venv.startswith("pip install")
    assert after_venv in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_quick_start_runs_on_the_fixtures(tmp_path: Path) -> None:
    quick_start = bash_blocks()[0].strip()
    steps = quick_start.split(" && ")
    assert steps[0].startswith("python3 -m venv") and "pip install" in steps[2]
    commands = " && ".join(steps[3:]).replace("out/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", commands], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_every_command_takes_json_and_quiet_and_force_where_it_writes() -> None:
    """The README's promise: every command takes --json and --quiet, and --force where it writes (-o)."""
    import click

    from loratools.cli.main import COMMANDS, cli

    assert "Every command takes `--json`" in README and "`--quiet`, and `--force` where it writes" in README
    missing = []
    for name in COMMANDS:
        command = cli.get_command(click.Context(cli), name)
        assert command is not None, name
        flags = {flag for param in command.params for flag in param.opts}
        wanted = {"--json", "--quiet"} | ({"--force"} if "--output" in flags else set())
        missing += [f"{name} {flag}" for flag in sorted(wanted - flags)]
    assert missing == []
