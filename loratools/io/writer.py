"""Writing checkpoints: streamed tensor by tensor, single file or shards + index.json, atomically.

Outputs are built under a temporary path in the same folder and renamed into place only when
complete, so a failed or interrupted run leaves nothing behind and never touches an input.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from loratools.errors import LoratoolsError, OutputExists
from loratools.io.checkpoint import SAFETENSORS_INDEX, WEIGHT_SUFFIXES, ShardLayout
from loratools.io.safetensors_file import SafetensorsWriter, TensorSpec

__all__ = [
    "CheckpointWriter",
    "atomic_output",
    "check_not_an_input",
    "copy_model_files",
    "plan_shards",
]

DEFAULT_METADATA = {"format": "pt"}


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[ShardLayout]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets
    its own shard). Names follow Hugging Face: ``model.safetensors`` or
    ``model-00001-of-00003.safetensors``."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_shard_bytes is not None and groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [ShardLayout("model.safetensors", groups[0])]
    n = len(groups)
    return [ShardLayout(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class CheckpointWriter:
    """Streams tensors into the files of a layout; writes ``index.json`` when there are several.

    Tensors must arrive in layout order (file by file). Use as a context manager; :meth:`write`
    accepts a tensor or its raw stored bytes (for bit-identical copies).

    Example:
        >>> with CheckpointWriter(out_dir, plan_shards(specs, 5 << 30)) as writer:
        ...     for name, tensor in tensors:
        ...         writer.write(name, tensor)
    """

    def __init__(
        self,
        folder: Path,
        layout: Sequence[ShardLayout],
        metadata: Mapping[str, str] | None = None,
        index_name: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.layout = list(layout)
        self.metadata = dict(metadata) if metadata is not None else dict(DEFAULT_METADATA)
        # an explicit index name is always written (a sharded source keeps its index); otherwise
        # an index is written only when there is more than one file
        self.index_name = index_name or (SAFETENSORS_INDEX if len(self.layout) > 1 else None)
        self._file_of = {spec.name: i for i, shard in enumerate(self.layout) for spec in shard.specs}
        self._current: SafetensorsWriter | None = None
        self._current_index = -1

    def __enter__(self) -> CheckpointWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, name: str, tensor: torch.Tensor | bytes) -> None:
        target = self._file_of[name]
        while self._current_index < target:
            self._open_next()
        assert self._current is not None
        self._current.write(name, tensor)

    def _open_next(self) -> None:
        if self._current is not None:
            self._current.close()
        self._current_index += 1
        shard = self.layout[self._current_index]
        path = self.folder / shard.filename
        self._current = SafetensorsWriter(path, shard.specs, self.metadata, shard.header)

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            if self._current is not None:
                self._current.abort()
            return
        while self._current_index < len(self.layout) - 1:
            self._open_next()  # empty shards, if any
        if self._current is not None:
            self._current.close()
        if self.index_name:
            self._write_index()

    def _write_index(self) -> None:
        weight_map = {spec.name: shard.filename for shard in self.layout for spec in shard.specs}
        total = sum(spec.nbytes for shard in self.layout for spec in shard.specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / str(self.index_name)).write_text(json.dumps(index, indent=2) + "\n")


def copy_model_files(source: Path, destination: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy a model directory's non-weight files (config.json, tokenizer files, …).

    Weight files and their index are not copied; nor are hidden files or sub-folders.

    Returns:
        the names copied.
    """
    copied = []
    for item in sorted(source.iterdir()):
        weight = item.suffix in WEIGHT_SUFFIXES or item.name.endswith(".index.json")
        if item.is_file() and not weight and not item.name.startswith(".") and item.name not in skip:
            shutil.copy2(item, destination / item.name)
            copied.append(item.name)
    return copied


def check_not_an_input(output: Path, inputs: Sequence[Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs."""
    out = Path(output).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise LoratoolsError(f"output {output} overlaps the input {item}; write somewhere else")


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The caller creates a file or a folder at the yielded path. On any exception the temporary
    path is removed and ``path`` is left as it was.

    Raises:
        OutputExists: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExists(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    temporary = path.parent / f".{path.name}.loratools-{tag}.tmp"
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f"nothing was written for {path}")
        if path.exists():
            old = path.parent / f".{path.name}.loratools-{tag}.old"
            os.replace(path, old)
            os.replace(temporary, path)
            _remove(old)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
