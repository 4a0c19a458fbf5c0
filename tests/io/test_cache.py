"""Passes larger than the page cache drop what they read and write behind them — same bytes either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loratools.io import cache
from loratools.io.checkpoint import open_checkpoint
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import CheckpointWriter, plan_shards


def _tensors(count: int) -> dict[str, torch.Tensor]:
    return {f"layer.{i}.weight": torch.randn(8 + i, 16).bfloat16() for i in range(count)}


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(folder, plan_shards(specs, 2000)) as writer:  # several shards
        for name, tensor in tensors.items():
            writer.write(name, tensor)


@pytest.fixture
def advice(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (offset, length) handed to posix_fadvise(DONTNEED)."""
    calls: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, what: int) -> None:
        assert what == os.POSIX_FADV_DONTNEED
        calls.append((offset, length))

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def test_a_checkpoint_past_its_share_of_memory_is_read_dropping_behind(tmp_path, monkeypatch, advice) -> None:
    """The same tensors either way; each read's byte range leaves the page cache only for a
    checkpoint past CACHE_SHARE of the machine's memory (here: a machine of 4 KiB)."""
    tensors = _tensors(5)
    _write(tmp_path / "ckpt", tensors)
    advice.clear()
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert not ckpt.exceeds_cache
    assert all(torch.equal(t, tensors[n]) for n, t in ckpt.iter_tensors()) and advice == []
    monkeypatch.setattr(cache, "physical_memory", lambda: 4096)
    assert ckpt.exceeds_cache
    assert all(torch.equal(t, tensors[n]) for n, t in ckpt.iter_tensors())
    assert sorted(length for _, length in advice) == sorted(t.numel() * 2 for t in tensors.values())  # bf16
    monkeypatch.setattr(cache, "physical_memory", lambda: 0)  # unknown: never drop
    assert not ckpt.exceeds_cache


def test_a_checkpoint_written_past_its_share_of_memory_drops_behind(tmp_path, monkeypatch, advice) -> None:
    """Each tensor's range is handed over when written and again one tensor later (or at close);
    the files read back identical."""
    tensors = _tensors(6)
    _write(tmp_path / "plain", tensors)
    assert advice == []
    monkeypatch.setattr(cache, "physical_memory", lambda: 4096)
    _write(tmp_path / "behind", tensors)
    lengths = sorted(length for _, length in advice)
    assert lengths == sorted(2 * [t.numel() * 2 for t in tensors.values()])  # every range twice
    for name in sorted(os.listdir(tmp_path / "plain")):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "behind" / name).read_bytes()


def test_a_refused_hint_changes_nothing(tmp_path, monkeypatch) -> None:
    """A file system that refuses posix_fadvise: the checkpoint is written and read all the same."""

    def refuse(*_: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    monkeypatch.setattr(cache, "physical_memory", lambda: 4096)
    tensors = _tensors(3)
    _write(tmp_path / "ckpt", tensors)
    assert all(torch.equal(t, tensors[n]) for n, t in open_checkpoint(tmp_path / "ckpt").iter_tensors())
