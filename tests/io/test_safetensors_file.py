"""Our streaming .safetensors reader/writer against the safetensors library itself."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.errors import CheckpointError
from loratools.io.checkpoint import ShardLayout
from loratools.io.safetensors_file import (
    DTYPES,
    MAX_TENSORS,
    SafetensorsFile,
    SafetensorsWriter,
    StoredRange,
    TensorSpec,
)
from loratools.io.writer import CheckpointWriter, plan_shards

ALL_DTYPES = sorted(DTYPES.values(), key=str)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), generator=gen, dtype=torch.uint8
    )
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_layout = a.dtype == b.dtype and a.shape == b.shape
    return same_layout and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_reads_what_safetensors_writes_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "a": sample(dtype, (3, 5), 1),
        "b.weight": sample(dtype, (7,), 2),
        "scalar": sample(dtype, (), 3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt", "k": "v"}
    for name, tensor in tensors.items():
        assert same_bits(st.read(name), tensor.contiguous())
        assert st.read_raw(name) == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_safetensors_reads_what_we_write_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"z": sample(dtype, (4, 2), 4), "a": sample(dtype, (0, 3), 5), "m": sample(dtype, (2, 2, 2), 6)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "y.safetensors", specs, {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(tmp_path / "y.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor)
    (length,) = struct.unpack("<Q", (tmp_path / "y.safetensors").read_bytes()[:8])
    assert length % 8 == 0


def test_writer_refuses_out_of_order_or_wrong_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = SafetensorsWriter(tmp_path / "z.safetensors", specs)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="is not"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before writing"):
        writer.close()


def write_valid(path: Path) -> bytes:
    save_file({"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:5], "shorter than its 8-byte header"),
        (lambda b: b[:20], "truncated inside its header"),
        (lambda b: b[:-10], "truncated or corrupt: .* at 'w'"),
        (lambda b: struct.pack("<Q", 12) + b"not json at!" + b[8:], "header is not JSON"),
        (lambda b: struct.pack("<Q", 2**40) + b[8:], "implausible"),
        (lambda b: b"\x00" * 3 + b"garbage" * 20, "not a valid .safetensors"),
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path: Path, mangle, message: str) -> None:
    good = write_valid(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good))
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_header_entry_with_wrong_offsets_is_refused(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}'
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    with pytest.raises(CheckpointError, match="do not match its shape"):
        SafetensorsFile(path)


# ---- header strictness: what the reference reader refuses, we refuse (with one clear line) -----

ONE = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'


def write_raw(path: Path, header: bytes, data_bytes: int) -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_bytes))
    return path


def reference_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 — safe_open has no __iter__
                f.get_tensor(name)
    except Exception:  # the reference raises its own SafetensorError/ValueError kinds
        return True
    return False


MALFORMED = {
    "overlapping offsets": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        8,
        "overlaps|claim more",
    ),
    "negative offset": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', 4, "data_offsets"),
    "offsets beyond the file": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 4, "gap|claim"),
    "gap between tensors": (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}',
        12,
        "leaves a gap",
    ),
    "trailing bytes": (ONE, 8, "4 bytes after the last tensor belong to no tensor"),
    "negative shape": (b'{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4, "shape"),
    "float shape": (b'{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4, "shape"),
    "bool offsets": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[false,true]}}', 4, "data_offsets"),
    "size differs from span": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4, "do not match"),
    "duplicate name": (
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        8,
        "names 'w' twice",
    ),
    "metadata not an object": (b'{"__metadata__":[1],' + ONE[1:], 4, "__metadata__ is a list"),
    "metadata value not a string": (b'{"__metadata__":{"a":1},' + ONE[1:], 4, "value for 'a' is a int"),
    "lone surrogate in a name": (
        b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        4,
        r"tensor name '\\ud800'",
    ),
    "shape overflowing u64 before a zero": (
        b'{"w":{"dtype":"F32","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}',
        0,
        "too large to address",
    ),
    "unknown dtype": (b'{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}', 4, "dtype 'F33'"),
    "NaN in the JSON": (b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', 4, "not JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_are_refused_like_the_reference_reader(tmp_path: Path, case: str) -> None:
    header, data_bytes, message = MALFORMED[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data_bytes)
    assert reference_refuses(path)  # we are not stricter than safetensors here, only as strict
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_control_characters_in_names_are_refused_and_never_printed(tmp_path: Path) -> None:
    # the reference reader accepts "\u001b[31m" in a name; printed raw it would drive the terminal
    path = write_raw(
        tmp_path / "esc.safetensors", b'{"a\\u001b[2J":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4
    )
    with pytest.raises(CheckpointError, match="control characters") as info:
        SafetensorsFile(path)
    assert str(info.value).isprintable() and "\\x1b" in str(info.value)


def test_deeply_nested_json_is_a_clear_error(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "deep.safetensors", b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0
    )
    with pytest.raises(CheckpointError, match="nested too deeply|__metadata__"):
        SafetensorsFile(path)


def test_header_length_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + ONE)
    with pytest.raises(CheckpointError, match="truncated inside its header .*10000 bytes claimed"):
        SafetensorsFile(path)


def test_a_million_declared_tensors_fail_before_the_json_is_parsed(tmp_path: Path) -> None:
    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = b"{" + b",".join(entry % i for i in range(MAX_TENSORS + 1)) + b"}"
    path = write_raw(tmp_path / "many.safetensors", header, 0)
    with pytest.raises(CheckpointError, match=f"declares {MAX_TENSORS + 1} tensors"):
        SafetensorsFile(path)


def test_tensors_claiming_more_than_the_data_fail_at_the_first_one_too_many(tmp_path: Path) -> None:
    # 5 000 overlapping 4-byte tensors over 8 data bytes: refused at the third, not after all
    entry = b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = b"{" + b",".join(entry % i for i in range(5_000)) + b"}"
    path = write_raw(tmp_path / "overlap.safetensors", header, 8)
    with pytest.raises(CheckpointError, match="claim more than the 8 bytes after the header, at 't2'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "header",
    [
        b'{"__metadata__":null,' + ONE[1:],  # null metadata
        b' {"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}',  # whitespace, unknown field
        b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
)
def test_what_the_reference_reader_accepts_we_accept(tmp_path: Path, header: bytes) -> None:
    path = write_raw(tmp_path / "ok.safetensors", header, 4)
    assert not reference_refuses(path)
    st = SafetensorsFile(path)
    assert st.read("w").shape == (1,)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsFile(fifo)  # opened non-blocking: no writer needed, no hang


def test_every_file_our_writer_makes_loads_in_the_reference_reader(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.{dtype}": sample(dtype, (3, i % 3), i) for i, dtype in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(1.5)
    layout = plan_shards([TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 24)
    metadata = {"format": "pt", "note": "ünïcode \u2713 and a\nnewline"}
    with CheckpointWriter(tmp_path / "out", layout, metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1
    seen = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == metadata
            for name in f.keys():  # noqa: SIM118
                assert same_bits(f.get_tensor(name), tensors[name].contiguous())
                seen.add(name)
    assert seen == set(tensors)


def test_the_writer_refuses_what_the_reference_reader_would_not_read(tmp_path: Path) -> None:
    spec = [TensorSpec("w", (1,), torch.float32)]
    with pytest.raises(ValueError, match="strings to strings"):
        SafetensorsWriter(tmp_path / "a.safetensors", spec, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unique"):
        SafetensorsWriter(tmp_path / "b.safetensors", spec * 2)
    with pytest.raises(ValueError, match="control characters"):
        SafetensorsWriter(tmp_path / "c.safetensors", [TensorSpec("a\x1b", (1,), torch.float32)])


def test_commands_refuse_a_malformed_base_and_write_nothing(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    # trailing bytes no tensor covers: once silently copied into merge outputs
    base = tmp_path / "base.safetensors"
    base.write_bytes((fixtures_dir / "base" / "model.safetensors").read_bytes() + b"\x00" * 8)
    for args in (
        ["inspect", base],
        ["merge", base, fixtures_dir / "adapter", "-o", tmp_path / "out.safetensors"],
    ):
        result = run_cli(*args)
        assert result.exit_code == 1 and result.stderr.startswith("error:"), result.stderr
        assert result.stderr.count("\n") == 1 and "8 bytes after the last tensor" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def _mixed_copy(tmp_path: Path, name: str) -> Path:
    """A file whose tensors alternate: written from memory, copied as a StoredRange of a source file."""
    source = tmp_path / "source.safetensors"
    tensors = {f"t{i}": sample(torch.bfloat16, (37, 5 + i), i) for i in range(4)}
    save_file(tensors, str(source))
    st = SafetensorsFile(source)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    out = tmp_path / name
    with CheckpointWriter(tmp_path, [ShardLayout(name, specs)]) as writer:
        for i, (n, t) in enumerate(tensors.items()):
            writer.write(n, st.stored_range(n) if i % 2 else t)
    return out


def test_stored_ranges_are_copied_byte_for_byte(tmp_path: Path) -> None:
    out = _mixed_copy(tmp_path, "out.safetensors")
    want = load_file(str(tmp_path / "source.safetensors"))
    got = load_file(str(out))  # the reference reader: the file is well formed
    assert got.keys() == want.keys()
    assert all(same_bits(got[n], want[n]) for n in want)


def test_stored_ranges_copy_through_user_space_where_the_kernel_copy_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = _mixed_copy(tmp_path, "kernel.safetensors").read_bytes()
    calls = []

    def refused(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    assert _mixed_copy(tmp_path, "user.safetensors").read_bytes() == kernel
    assert calls  # the kernel copy was tried, and its refusal fell back


def test_a_stored_range_of_the_wrong_size_or_a_truncated_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    save_file({"a": sample(torch.float32, (64,), 0)}, str(source))
    spec = TensorSpec("a", (64,), torch.float32)
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [spec])
    with pytest.raises(RuntimeError, match="has 4 bytes, not 256"):
        writer.write("a", StoredRange(source, 8, 12))
    writer.abort()
    info = SafetensorsFile(source).infos["a"]
    os.truncate(source, info.begin + 100)  # shrunk after its header was read
    writer = SafetensorsWriter(tmp_path / "out2.safetensors", [spec])
    with pytest.raises(CheckpointError, match="truncated"):
        writer.write("a", StoredRange(source, info.begin, info.end))
    writer.abort()
