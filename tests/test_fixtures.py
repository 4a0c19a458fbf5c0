"""The committed fixtures are what fixtures/make_fixtures.py makes (same seed, same torch).

Floating-point results are not bit-identical across CPUs and BLAS/LAPACK builds (vectorised
``randn``, Householder QR and matrix products round differently), so the regenerated tensors are
compared within a stated tolerance; everything that is not a computed float (JSON files, tensor
names, shapes, dtypes, offsets) must be byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.make_fixtures import PLANTED
from fixtures.make_fixtures import main as make_fixtures
from loratools.io.checkpoint import open_checkpoint
from loratools.io.safetensors_file import SafetensorsFile
from tests.tolerances import EPS

FOLDERS = ["base", "finetuned", "base-sharded", "base-bf16", "adapter"]
# float32: the planted ΔW = U·diag(σ)·Vᵀ goes through a Householder QR and products over at most
# n = 64 terms, whose rounding is bounded by ~n·eps·σ₁ (64 · 2⁻²³ · 0.8 ≈ 6e-6); randn itself may
# differ by an ulp between vectorised kernels. 2× that bound; a different seed or formula moves
# values by ~0.1. (Observed across CPUs: 6e-8.)
FP32_ATOL = 2 * 64 * EPS[torch.float32] * PLANTED[0]
# bfloat16: base.bfloat16() of a float32 value one ulp away may round to the neighbouring bf16
# value, one bf16 ulp ≤ 2⁻⁷·|x| apart.
BF16_RTOL = EPS[torch.bfloat16]


def files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for n in FOLDERS for p in sorted((root / n).rglob("*")) if p.is_file()
    }


def assert_same_tensors(ours: Path, committed: Path) -> None:
    a, b = SafetensorsFile(ours), SafetensorsFile(committed)
    assert a.header == b.header, committed  # names, shapes, dtypes, offsets, metadata: exact
    for name in b.infos:
        x, y = a.read(name), b.read(name)
        if y.dtype == torch.bfloat16:
            # BF16_RTOL: derived above
            torch.testing.assert_close(x, y, rtol=BF16_RTOL, atol=0, msg=f"{committed}: {name}")
        else:
            # FP32_ATOL: derived above
            torch.testing.assert_close(x, y, rtol=0, atol=FP32_ATOL, msg=f"{committed}: {name}")


@pytest.mark.slow
def test_regenerating_the_fixtures_gives_the_committed_files(tmp_path: Path, fixtures_dir: Path) -> None:
    make_fixtures(tmp_path)
    ours, committed = files(tmp_path), files(fixtures_dir)
    assert ours.keys() == committed.keys()
    for rel, path in committed.items():
        if path.suffix == ".safetensors":
            assert_same_tensors(ours[rel], path)
        else:
            assert ours[rel].read_bytes() == path.read_bytes(), rel
    assert (tmp_path / "planted.json").read_text() == (fixtures_dir / "planted.json").read_text()


def test_the_fixture_comparison_notices_a_changed_value(tmp_path: Path, fixtures_dir: Path) -> None:
    # the tolerance is far below what a real change moves: one float nudged by 1e-4 is caught
    path = fixtures_dir / "finetuned" / "model.safetensors"
    data = bytearray(path.read_bytes())
    info = next(iter(SafetensorsFile(path).infos.values()))
    value = torch.frombuffer(data[info.begin : info.begin + 4], dtype=torch.float32).clone() + 1e-4
    data[info.begin : info.begin + 4] = value.numpy().tobytes()
    (tmp_path / "changed.safetensors").write_bytes(bytes(data))
    with pytest.raises(AssertionError):
        assert_same_tensors(tmp_path / "changed.safetensors", path)
    assert_same_tensors(path, path)


def test_finetune_differs_by_the_planted_spectrum(fixtures_dir: Path) -> None:
    planted = json.loads((fixtures_dir / "planted.json").read_text())
    base, tuned = open_checkpoint(fixtures_dir / "base"), open_checkpoint(fixtures_dir / "finetuned")
    for name in base.names():
        delta = tuned.get(name) - base.get(name)
        if name in planted["singular_values"]:
            s = torch.linalg.svdvals(delta)[:4]
            noise_bound = 3 * planted["noise_std"] * (delta.shape[0] ** 0.5 + delta.shape[1] ** 0.5)
            # noise_bound: 3× the planted noise's spectral norm, ≈ noise_std·(√m + √n)
            torch.testing.assert_close(
                s, torch.tensor(planted["singular_values"][name]), rtol=0, atol=noise_bound
            )
        else:  # copied, not computed: the stored bytes are the base's
            assert torch.equal(delta, torch.zeros_like(delta))
