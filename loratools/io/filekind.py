"""What a path holds, read from headers only: the io half of :mod:`loratools.formats.detect`.

:func:`detect_path` reads what it needs to name a file — a safetensors header, an
``adapter_config.json``, a GGUF header, a folder's file list — never the tensor data, and hands
it to the pure detector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratools.errors import CheckpointError, LoratoolsError, UnknownFormat
from loratools.formats import peft
from loratools.formats.detect import FileKind, adapter_kind, checkpoint_kind, gguf_kind, looks_like_adapter

__all__ = ["GgufHeader", "detect_path", "read_gguf_header"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's key/values and tensor table (no data).

    Attributes:
        kv: metadata as plain values (``general.architecture``, ``adapter.lora.alpha``, …).
        tensors: ``(name, shape in PyTorch order, type name)`` per tensor, in file order.
    """

    kv: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...], str]]


def read_gguf_header(path: Path) -> GgufHeader:
    """The key/values and tensor table of a GGUF file (the ``gguf`` extra).

    Raises:
        CheckpointError: not a readable GGUF file.
        MissingExtra: the gguf package is not installed.
    """
    from loratools.io.gguf_header import open_gguf_reader
    from loratools.io.gguf_io import read_gguf_kv

    reader = open_gguf_reader(path)  # the header is bounded before gguf's reader trusts it
    tensors = [
        (t.name, tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type.name)
        for t in reader.tensors
    ]
    return GgufHeader(read_gguf_kv(reader), tensors)


def detect_path(path: Path) -> FileKind:
    """What the local ``path`` holds: an adapter (PEFT folder or file, kohya/LyCORIS file,
    cloneofsimo file, GGUF adapter) or a model checkpoint (safetensors, sharded, PyTorch, GGUF).

    Raises:
        CheckpointError: missing or unreadable paths.
        UnknownFormat: a path that is neither an adapter nor a checkpoint (saying why).
    """
    if path.is_dir():
        return _detect_folder(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a pipe or a device?); pass a weights file")
    if _magic(path) == GGUF_MAGIC:
        header = read_gguf_header(path)
        return gguf_kind(header.kv, [kind for _, shape, kind in header.tensors if len(shape) > 1])
    if path.suffix == ".safetensors":
        return _detect_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        if path.name == "adapter_model.bin":
            return adapter_kind([], config=read_adapter_config(path.parent / peft.CONFIG_NAME))
        return checkpoint_kind("pytorch")
    if path.name.endswith(".index.json"):
        from loratools.io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        return checkpoint_kind(ckpt.kind, len(ckpt.files))
    raise UnknownFormat(
        f"{path}: not an adapter or a checkpoint (expected a folder, .safetensors, .gguf, .bin/.pt)"
    )


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from exc


def read_adapter_config(path: Path, *, missing_ok: bool = True) -> dict[str, Any]:
    """An ``adapter_config.json`` as a dict; ``{}`` when it is absent and ``missing_ok``.

    Raises:
        CheckpointError: unreadable, not JSON, or not a JSON object (or absent, unless missing_ok).
    """
    if missing_ok and not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {peft.CONFIG_NAME} ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {peft.CONFIG_NAME} must hold a JSON object")
    return config


def _detect_folder(path: Path) -> FileKind:
    from loratools.io.checkpoint import open_checkpoint

    if (path / peft.CONFIG_NAME).is_file():
        weights = path / peft.WEIGHTS_NAME
        keys = _safetensors_keys(weights) if weights.is_file() else []
        return adapter_kind(keys, config=read_adapter_config(path / peft.CONFIG_NAME))
    pickled = _pytorch_folder(path)
    if pickled is not None:
        return pickled
    try:
        ckpt = open_checkpoint(path)
    except LoratoolsError as exc:
        raise UnknownFormat(
            f"{path}: not an adapter folder (no {peft.CONFIG_NAME}), and not a model folder: {exc}"
        ) from None
    return checkpoint_kind(ckpt.kind, len(ckpt.files))


def _pytorch_folder(path: Path) -> FileKind | None:
    """A folder of PyTorch pickles only, named without unpickling it (that is the command's job,
    and costs the whole model's loading time)."""
    from loratools.io.checkpoint import PYTORCH_INDEX

    if any(path.glob("*.safetensors")):
        return None
    if (path / PYTORCH_INDEX).is_file():
        try:
            shards = len(set(json.loads((path / PYTORCH_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # open_checkpoint says what is wrong with it
        return checkpoint_kind("pytorch", shards)
    if any((path / name).is_file() for name in ("pytorch_model.bin", "model.pt", "model.bin")):
        return checkpoint_kind("pytorch")
    return None


def _safetensors_keys(path: Path) -> list[str]:
    from loratools.io.safetensors_file import SafetensorsFile

    return list(SafetensorsFile(path).infos)


def _detect_safetensors(path: Path) -> FileKind:
    from loratools.io.safetensors_file import SafetensorsFile

    st = SafetensorsFile(path)
    keys = list(st.infos)
    if not looks_like_adapter(keys, st.metadata):
        return checkpoint_kind("safetensors")
    config_file = path.parent / peft.CONFIG_NAME
    peft_keys = any(".lora_A." in k or k.startswith("base_model.model.") for k in keys)
    config = read_adapter_config(config_file) if peft_keys and config_file.is_file() else None
    shapes = {name: info.shape for name, info in st.infos.items()}
    try:
        return adapter_kind(keys, shapes=shapes, metadata=st.metadata, config=config)
    except UnknownFormat as exc:
        raise UnknownFormat(f"{path}: {exc}") from None
