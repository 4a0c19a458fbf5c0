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
