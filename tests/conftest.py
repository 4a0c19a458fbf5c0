"""Shared fixtures: seeds, the bundled tiny checkpoints, and a CLI runner."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def fixture_copy(tmp_path: Path):
    """Copy a fixture folder into tmp_path (for tests that must be free to modify it)."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))

    return copy


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    from loratools.cli.main import cli

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run


# Property tests draw the same examples on every run and machine (deterministic CI); a failure
# found locally is still replayed from .hypothesis/ first.
from hypothesis import settings  # noqa: E402

settings.register_profile("loratools", derandomize=True, deadline=None)
settings.load_profile("loratools")
