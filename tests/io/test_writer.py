"""Atomic outputs: complete or absent, never partial; inputs never overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools.errors import LoratoolsError, OutputExists
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import (
    CheckpointWriter,
    atomic_output,
    check_not_an_input,
    copy_model_files,
    plan_shards,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "loratools" in p.name)


def test_success_renames_into_place(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert leftovers(tmp_path) == []


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "half.safetensors").write_bytes(b"123")
        raise ValueError("boom")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_existing_output_refused_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputExists, match="--force"), atomic_output(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "old.txt").exists()
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out", force=True) as tmp:
        tmp.mkdir()
        raise RuntimeError("failed halfway")
    assert (tmp_path / "out" / "old.txt").read_text() == "old"  # a failed forced run keeps the old output
    with atomic_output(tmp_path / "out", force=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_writer_failure_inside_atomic_output_leaves_nothing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]
    with (
        pytest.raises(RuntimeError),
        atomic_output(tmp_path / "ckpt") as tmp,
        CheckpointWriter(tmp, plan_shards(specs, 16)) as writer,
    ):
        writer.write("a", torch.zeros(4))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_plan_shards_respects_the_size_and_names_like_hugging_face() -> None:
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    layout = plan_shards(specs, 100)
    assert [s.filename for s in layout] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [len(s.specs) for s in layout] == [2, 2, 1]
    assert all(sum(spec.nbytes for spec in s.specs) <= 100 for s in layout)
    assert [s.filename for s in plan_shards(specs, None)] == ["model.safetensors"]


def test_outputs_overlapping_inputs_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for output in (model, model / "sub", tmp_path):
        with pytest.raises(LoratoolsError, match="overlaps the input"):
            check_not_an_input(output, [model])
    check_not_an_input(tmp_path / "elsewhere", [model, None])


def test_copy_model_files_skips_weights(fixtures_dir: Path, tmp_path: Path) -> None:
    copied = copy_model_files(fixtures_dir / "base-sharded", tmp_path)
    assert copied == ["config.json", "generation_config.json"]
