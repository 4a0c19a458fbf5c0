"""The committed fixtures are exactly what fixtures/make_fixtures.py makes (same seed, same torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.make_fixtures import main as make_fixtures
from loratools.io.checkpoint import open_checkpoint


def files(root: Path) -> dict[str, bytes]:
    names = ["base", "finetuned", "base-sharded", "base-bf16", "adapter"]
    return {
        str(p.relative_to(root)): p.read_bytes()
        for n in names
        for p in sorted((root / n).rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_regenerating_the_fixtures_is_byte_identical(tmp_path: Path, fixtures_dir: Path) -> None:
    make_fixtures(tmp_path)
    assert files(tmp_path) == files(fixtures_dir)
    assert (tmp_path / "planted.json").read_text() == (fixtures_dir / "planted.json").read_text()


def test_finetune_differs_by_the_planted_spectrum(fixtures_dir: Path) -> None:
    planted = json.loads((fixtures_dir / "planted.json").read_text())
    base, tuned = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    for name in base.names():
        delta = tuned.get(name) - base.get(name)
        if name in planted["singular_values"]:
            s = torch.linalg.svdvals(delta)[:4]
            noise_bound = 3 * planted["noise_std"] * (delta.shape[0] ** 0.5 + delta.shape[1] ** 0.5)
            torch.testing.assert_close(
                s, torch.tensor(planted["singular_values"][name]), rtol=0, atol=noise_bound
            )
        else:
            assert torch.equal(delta, torch.zeros_like(delta))
