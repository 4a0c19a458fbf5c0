"""Lazy checkpoint reading: single files, model folders, shards, PyTorch pickles, bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools.errors import CheckpointError, MissingKeys, UnknownFormat
from loratools.io.checkpoint import open_checkpoint
from loratools.io.writer import CheckpointWriter, plan_shards


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return dict(ckpt.iter_tensors())


def test_single_file_and_folder_agree_with_safetensors(fixtures_dir: Path) -> None:
    reference = load_file(fixtures_dir / "base" / "model.safetensors")
    for path in (fixtures_dir / "base", fixtures_dir / "base" / "model.safetensors"):
        ckpt = open_checkpoint(path)
        assert ckpt.kind == "safetensors"
        assert set(ckpt.names()) == set(reference)
        for name, tensor in ckpt.iter_tensors():
            assert torch.equal(tensor, reference[name])
            assert ckpt.info(name).shape == tuple(tensor.shape)


def test_sharded_equals_single(fixtures_dir: Path) -> None:
    sharded = open_checkpoint(fixtures_dir / "base-sharded")
    assert sharded.kind == "safetensors-sharded" and len(sharded.files) > 1
    assert sharded.index_name == "model.safetensors.index.json"
    single = all_tensors(fixtures_dir / "base")
    assert sharded.names() == list(single)  # same storage order
    for name, tensor in sharded.iter_tensors():
        assert torch.equal(tensor, single[name])


def test_bf16_is_read_as_stored(fixtures_dir: Path) -> None:
    bf16 = all_tensors(fixtures_dir / "base-bf16")
    fp32 = all_tensors(fixtures_dir / "base")
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[name].bfloat16())


def test_prefetch_yields_every_tensor_once_in_order(fixtures_dir: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "base-sharded")
    chosen = ckpt.names()[::3]
    assert [name for name, _ in ckpt.iter_tensors(chosen)] == chosen
    assert [name for name, _ in ckpt.iter_tensors(chosen, prefetch=False)] == chosen


@pytest.mark.parametrize("max_shard", [None, 10_000, 1])
def test_single_to_sharded_round_trip_is_bit_exact(tmp_path: Path, fixtures_dir: Path, max_shard) -> None:
    source = open_checkpoint(fixtures_dir / "base-bf16")
    layout = plan_shards([source.info(n) for n in source.names()], max_shard)
    with CheckpointWriter(tmp_path / "out", layout, metadata=source.metadata) as writer:
        for name, tensor in source.iter_tensors():
            writer.write(name, tensor)
    copy = open_checkpoint(tmp_path / "out")
    assert copy.kind == ("safetensors" if len(layout) == 1 else "safetensors-sharded")
    assert copy.metadata == source.metadata
    for name in source.names():
        assert copy.info(name).dtype == torch.bfloat16
        assert copy.get_raw(name) == source.get_raw(name)
    # and back to one file: byte-identical to the original file
    back = tmp_path / "back"
    layout = plan_shards([copy.info(n) for n in copy.names()], None)
    with CheckpointWriter(back, layout, metadata=copy.metadata) as writer:
        for name in copy.names():
            writer.write(name, copy.get_raw(name))
    ours = (back / "model.safetensors").read_bytes()
    assert ours == (fixtures_dir / "base-bf16" / "model.safetensors").read_bytes()


def test_layout_reuses_source_headers_for_identical_copies(tmp_path: Path, fixtures_dir: Path) -> None:
    source = open_checkpoint(fixtures_dir / "base-sharded")
    with CheckpointWriter(tmp_path / "copy", source.layout(), source.metadata, source.index_name) as writer:
        for name in source.names():
            writer.write(name, source.get_raw(name))
    for file in source.files:
        assert (tmp_path / "copy" / file.name).read_bytes() == file.read_bytes()
    index = json.loads((tmp_path / "copy" / "model.safetensors.index.json").read_text())
    original = json.loads((fixtures_dir / "base-sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]


def test_index_pointing_outside_the_folder_is_refused(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the model folder"):
        open_checkpoint(folder)


def test_missing_shard_is_named(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    (folder / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(MissingKeys, match="model-00002-of-00005.safetensors"):
        open_checkpoint(folder)


def test_index_naming_a_tensor_its_shard_lacks(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00005.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingKeys, match="model.extra.weight"):
        open_checkpoint(folder)


def test_nonexistent_and_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnknownFormat, match="not a checkpoint"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormat, match="no model weights"):
        open_checkpoint(tmp_path / "empty")


def test_pytorch_bin_loads_with_weights_only(tmp_path: Path, fixtures_dir: Path) -> None:
    reference = all_tensors(fixtures_dir / "base")
    torch.save(reference, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="safetensors is preferred"):
        ckpt = open_checkpoint(tmp_path)
    assert ckpt.kind == "pytorch"
    for name, tensor in ckpt.iter_tensors():
        assert torch.equal(tensor, reference[name])


class Exploit:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickle_with_python_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused to load"), pytest.warns(UserWarning):
        open_checkpoint(path)
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError), pytest.warns(UserWarning):
        open_checkpoint(path)


def test_duplicate_tensor_across_shards_is_refused(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    shutil.copy(first, second)
    with pytest.raises((CheckpointError, MissingKeys)):
        open_checkpoint(folder)


@pytest.mark.slow
def test_reading_a_sharded_checkpoint_keeps_memory_near_one_tensor(tmp_path: Path) -> None:
    """Stream 8 × 32 MB tensors in 4 shards: resident memory grows by about two tensors
    (the one held and the one prefetched), not by the 256 MB checkpoint."""
    tensor_mb, count = 32, 8
    elements = tensor_mb * 2**20 // 4
    specs = [(f"t{i}", (elements,), torch.float32) for i in range(count)]
    from loratools.io.safetensors_file import TensorSpec

    layout = plan_shards([TensorSpec(*s) for s in specs], 2 * tensor_mb * 2**20)
    with CheckpointWriter(tmp_path / "big", layout) as writer:
        for name, _, _ in specs:
            writer.write(name, torch.full((elements,), 1.0))
    script = textwrap.dedent(
        f"""
        import psutil, torch
        from loratools.io.checkpoint import open_checkpoint
        process = psutil.Process()
        ckpt = open_checkpoint({str(tmp_path / "big")!r})
        start = process.memory_info().rss
        peak = 0
        total = 0.0
        for name, tensor in ckpt.iter_tensors():
            total += float(tensor.sum())
            peak = max(peak, process.memory_info().rss - start)
        print(peak / 2**20, total)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    growth_mb, total = (float(x) for x in out.split())
    assert total == count * elements
    assert growth_mb < 3.5 * tensor_mb, f"resident memory grew by {growth_mb:.0f} MB"


def test_an_index_named_directly_is_checked_like_its_folder(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    index_path = folder / "model.safetensors.index.json"
    ckpt = open_checkpoint(index_path)
    assert ckpt.kind == "safetensors-sharded" and ckpt.path == index_path and ckpt.model_dir == folder
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00005.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingKeys, match="model.extra.weight"):
        open_checkpoint(index_path)


# ---- the index and the shards must agree; shards stay in the folder (or the Hub cache) ---------


def edit_index(folder: Path, edit) -> Path:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return index_path


def test_a_stored_tensor_missing_from_the_index_is_an_error(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    edit_index(folder, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the index: model\.norm\.weight \(in model-0000"):
        open_checkpoint(folder)


def test_a_tensor_mapped_to_the_wrong_shard_is_an_error(fixture_copy) -> None:
    folder = fixture_copy("base-sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][first])
    edit_index(folder, lambda wm: wm.update({first: other}))
    with pytest.raises(CheckpointError, match=f"wrong shard: {first} \\(index: {other}, stored in"):
        open_checkpoint(folder)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"weight_map": {"w": ["a.safetensors"]}}, r"map a tensor name to a shard file name: 'w': \['a"),
        ({"weight_map": {"w": {"x": 1}}}, "map a tensor name to a shard file name"),
        ({"weight_map": ["w"]}, 'needs a "weight_map" object'),
        ([1, 2], 'needs a "weight_map" object'),
    ],
)
def test_malformed_index_is_one_clear_line(tmp_path: Path, document: object, message: str | None) -> None:
    index_path = tmp_path / "model.safetensors.index.json"
    index_path.write_text(json.dumps(document))
    with pytest.raises((CheckpointError, MissingKeys), match=message) as info:
        open_checkpoint(tmp_path)
    assert str(index_path) in str(info.value) and "\n" not in str(info.value)


def test_repeated_names_or_deep_nesting_in_an_index_are_refused(tmp_path: Path) -> None:
    index_path = tmp_path / "model.safetensors.index.json"
    index_path.write_text('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}')
    with pytest.raises(CheckpointError, match="not a valid index: it lists 'w' twice"):
        open_checkpoint(tmp_path)
    index_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        open_checkpoint(tmp_path)


def test_a_shard_symlinked_out_of_the_folder_is_refused(fixture_copy, tmp_path: Path) -> None:
    folder = fixture_copy("base-sharded")
    shard = folder / "model-00002-of-00005.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symlink to .*outside the model folder.*blobs/"):
        open_checkpoint(folder)


def test_shards_linked_into_a_hub_cache_blobs_folder_are_followed(fixtures_dir: Path, tmp_path: Path) -> None:
    # the Hub cache layout: models--org--name/snapshots/<rev>/<file> → ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted((fixtures_dir / "base-sharded").iterdir())):
        shutil.copy(file, blobs / f"{i:040x}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"{i:040x}"))
    ckpt = open_checkpoint(snapshot)
    assert ckpt.kind == "safetensors-sharded" and len(ckpt) == len(open_checkpoint(fixtures_dir / "base"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
@pytest.mark.parametrize("name", ["x.safetensors", "x.bin", "model.safetensors.index.json"])
def test_a_fifo_is_refused_not_read(tmp_path: Path, name: str) -> None:
    os.mkfifo(tmp_path / name)
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(tmp_path / name)
