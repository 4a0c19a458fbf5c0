"""Writing checkpoints: streamed tensor by tensor, single file or shards + index.json, atomically.

Outputs are built under a temporary path in the same folder and renamed into place only when
complete, so a failed or interrupted run leaves nothing behind and never touches an input.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from queue import Queue
from threading import Thread
from typing import Any

import torch

from loratools.errors import LoratoolsError, OutputExists
from loratools.io.cache import exceeds_cache
from loratools.io.checkpoint import SAFETENSORS_INDEX, WEIGHT_SUFFIXES, ShardLayout
from loratools.io.safetensors_file import SafetensorsWriter, StoredRange, TensorSpec

__all__ = [
    "CheckpointWriter",
    "atomic_output",
    "check_not_an_input",
    "check_output_free",
    "checkpoint_output_is_file",
    "copy_model_files",
    "model_files",
    "plan_shards",
    "remove_stale_temporaries",
    "write_behind",
    "write_checkpoint",
    "write_tensors",
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
    accepts a tensor, its raw stored bytes, or the :class:`StoredRange` of a source file holding
    them (copied file to file in the kernel); the last two give bit-identical copies.

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
        # more than the page cache holds: written tensors leave it behind the pass (io.cache)
        self._drop_behind = exceeds_cache(sum(spec.nbytes for shard in self.layout for spec in shard.specs))
        self._current: SafetensorsWriter | None = None
        self._current_index = -1

    def __enter__(self) -> CheckpointWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, name: str, tensor: torch.Tensor | bytes | StoredRange) -> None:
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
        self._current = SafetensorsWriter(
            path, shard.specs, self.metadata, shard.header, drop_behind=self._drop_behind
        )

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


def write_checkpoint(
    folder: Path,
    layout: list[ShardLayout],
    metadata: Mapping[str, str] | None,
    index_name: str | None,
    tensors: Iterator[tuple[str, Any]],
) -> None:
    """Write ``tensors`` (name, tensor or stored bytes, in layout order) into ``folder`` as the
    shards of ``layout`` (plus ``index_name`` when given), on a writer thread (:func:`write_behind`)."""
    with CheckpointWriter(folder, layout, metadata or {"format": "pt"}, index_name) as writer:
        write_behind(tensors, writer.write)


def write_tensors(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    output: str | Path,
    *,
    force: bool = False,
) -> Path:
    """One ``.safetensors`` file of ``tensors`` (in their order), atomically, through the streaming
    writer (:class:`~loratools.io.safetensors_file.SafetensorsWriter`)."""
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with atomic_output(output, force=force) as path:
        writer = SafetensorsWriter(path, specs, dict(metadata))
        try:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        except BaseException:
            writer.abort()  # atomic_output removes the partial file
            raise
        writer.close()
    return Path(output)


def write_behind(items: Iterator[tuple[str, Any]], write: Callable[[str, Any], None]) -> None:
    """Call ``write`` on each item in a second thread, so computing the next tensor overlaps
    writing this one (reads already run ahead in another). At most one item waits in between."""
    pending: Queue[tuple[str, Any] | None] = Queue(maxsize=1)
    failures: list[BaseException] = []

    def consume() -> None:
        while (item := pending.get()) is not None:
            if not failures:
                try:
                    write(*item)
                except BaseException as exc:  # handed to the producer below
                    failures.append(exc)

    thread = Thread(target=consume, name="loratools-write", daemon=True)
    thread.start()
    try:
        for item in items:
            if failures:
                break
            pending.put(item)
    finally:
        pending.put(None)
        thread.join()
    if failures:
        raise failures[0]


# Top-level files that are the model's weights in another form: copying them next to rewritten
# weights would ship a stale, unmerged copy (transformers may even load it instead).
OTHER_WEIGHT_SUFFIXES = (*WEIGHT_SUFFIXES, ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")


def copy_model_files(source: Path, destination: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy everything of a model directory except the weights being rewritten.

    Copied: every top-level file that is not a weight file (``*.safetensors``, ``*.bin``, …) or an
    ``*.index.json``, and every sub-folder recursively, weights included (a sentence-transformers
    model keeps ``1_Pooling/``, ``2_Dense/model.safetensors`` there, which nothing rewrites).
    Not copied: hidden files and folders (``.git``, ``.cache``) at any depth, names in ``skip``,
    folder symlinks, and anything that is not a regular file (a FIFO would block the copy).

    Returns:
        the relative paths (POSIX) of the files copied, folder by folder in name order.
    """
    copied = []
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name in skip:
            continue
        if item.is_dir() and not item.is_symlink():
            copied += [f"{item.name}/{name}" for name in _copy_tree(item, destination / item.name)]
        elif item.is_file() and not _is_weight_file(item.name):
            shutil.copy2(item, destination / item.name)
            copied.append(item.name)
    return copied


def _is_weight_file(name: str) -> bool:
    return name.lower().endswith(OTHER_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _copy_tree(source: Path, destination: Path) -> list[str]:
    """Copy a sub-folder's regular files (hidden entries and folder symlinks left out)."""
    destination.mkdir(exist_ok=True)
    copied = []
    for item in sorted(source.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir() and not item.is_symlink():
            copied += [f"{item.name}/{name}" for name in _copy_tree(item, destination / item.name)]
        elif item.is_file():
            shutil.copy2(item, destination / item.name)
            copied.append(item.name)
    return copied


PICKLED_OR_FOREIGN = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")


def checkpoint_output_is_file(output: str | Path, *, source: str | Path, shards: int | None = None) -> bool:
    """Outputs are what their names say: ``NAME.safetensors`` is one safetensors file, any
    other name a model folder (``model.safetensors`` or shards + index, plus the model's files).

    Args:
        output: the output path the user named.
        source: the input, for messages.
        shards: the number of weight files of a sharded output (files + index), None when it is
            one plain file. A sharded model is only ever written as a folder.

    Returns:
        True for a single-file output, False for a folder.

    Raises:
        LoratoolsError: a name that promises another format (``.bin``, ``.gguf``, …, or
            ``.SAFETENSORS``, which loratools would not read back), or a sharded model named
            ``.safetensors``.
    """
    name = Path(output).name
    suffix = Path(name).suffix
    if suffix.lower() in PICKLED_OR_FOREIGN or (
        suffix.lower() == ".safetensors" and suffix != ".safetensors"
    ):
        raise LoratoolsError(
            f"-o {output}: loratools writes checkpoints as safetensors; name the output "
            f"{Path(name).stem}.safetensors (one file) or {Path(name).stem} (a model folder)"
        )
    if suffix != ".safetensors":
        return False
    if shards is not None:
        raise LoratoolsError(
            f"-o {output}: {source} is sharded ({shards} file(s) and an index), so the result "
            f"is a model folder; name the output without .safetensors (e.g. -o {Path(name).stem})"
        )
    return True


def model_files(source: Path) -> list[str]:
    """The top-level names :func:`copy_model_files` would carry (folders with a trailing ``/``)."""
    names = []
    for item in sorted(source.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir() and not item.is_symlink():
            names.append(item.name + "/")
        elif item.is_file() and not _is_weight_file(item.name):
            names.append(item.name)
    return names


def check_not_an_input(output: Path, inputs: Sequence[Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs."""
    out = Path(output).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise LoratoolsError(f"output {output} overlaps the input {item}; write somewhere else")


def check_output_free(path: str | Path, *, force: bool = False) -> None:
    """Refuse an existing output before any work (:func:`atomic_output` checks again when it
    publishes, so a run that started first cannot be overwritten either).

    Raises:
        OutputExists: ``path`` exists (a dangling symlink too) and ``force`` is False.
    """
    if _occupied(Path(path)) and not force:
        raise OutputExists(f"{path} already exists; pass --force to replace it")


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success publish it as ``path``.

    The caller creates a file or a folder at the yielded path. On any exception (SIGTERM too, when
    the CLI runs: it raises there) the temporary is removed and ``path`` is left as it was.

    Publishing claims ``path`` atomically: without ``force`` it fails if ``path`` appeared while
    this run was writing (another run got there first), so two runs can never both "succeed" on
    one output. Temporaries are named ``.<name prefix>.<hash of the name>.<host>-<pid>-<random>
    .loratools.tmp`` (at most about 150 bytes, whatever the output name's length); those of this output
    left by a process that no longer runs (SIGKILL, power loss) are removed first.

    Raises:
        OutputExists: ``path`` exists (before or at publishing) and ``force`` is False.
    """
    path = Path(path)
    check_output_free(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary_name(path, "tmp")
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f"nothing was written for {path}")
        if force:
            _replace(temporary, path)
        else:
            _claim(temporary, path)
    finally:
        _remove(temporary)


TEMPORARY_PREFIX = 24  # characters of the output name kept in a temporary's name, for people


def _name_tag(name: str) -> str:
    """``<prefix>.<hash>``: what every temporary of the output ``name`` starts with (after the dot)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{name[:TEMPORARY_PREFIX]}.{digest}"


def _host_tag() -> str:
    """Four hex digits of the host name: a pid is only checked on the host that owns it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]


def _temporary_name(path: Path, kind: str) -> Path:
    tag = f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.parent / f".{_name_tag(path.name)}.{tag}.loratools.{kind}"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove temporaries of the output ``path`` whose writing process is gone (killed, crashed).

    Only names of this output's exact pattern, written on this host by a pid that is not running,
    are touched; a live run's temporary is never removed. An old output that a killed ``--force``
    run had moved aside is put back when nothing replaced it.

    Returns:
        the paths removed.
    """
    path = Path(path)
    pattern = re.compile(
        rf"\.{re.escape(_name_tag(path.name))}\.{_host_tag()}-(?P<pid>\d+)-[0-9a-f]{{8}}\.loratools\.(?:tmp|old)"
    )
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    _warn_about_unowned_temporaries(path, entries)
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or _pid_alive(int(match["pid"])):
            continue
        if entry.name.endswith(".old") and not _occupied(path):
            # killed between moving the old output aside and publishing the new one: restore it
            os.replace(entry.path, path)
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _warn_about_unowned_temporaries(path: Path, entries: list[os.DirEntry[str]]) -> None:
    """Temporaries named ``.NAME.loratools-XXXXXXXX.tmp`` (earlier loratools releases named them
    so) carry no process id, so nothing can tell whether their run still goes on: point them out,
    never remove them."""
    legacy = re.compile(rf"\.{re.escape(path.name)}\.loratools-[0-9a-f]{{8}}\.(?:tmp|old)")
    found = [entry.name for entry in entries if legacy.fullmatch(entry.name)]
    if found:
        warnings.warn(
            f"{path.parent}: leftover temporaries of an earlier loratools run on {path.name}: "
            f"{', '.join(found)}; delete them if no loratools run is writing {path.name}",
            stacklevel=4,
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or no way to tell): keep its files
    return True


def _occupied(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _claim(temporary: Path, path: Path) -> None:
    """Publish ``temporary`` as ``path`` only if ``path`` does not exist, atomically.

    A file is hard-linked (``link`` fails if the name exists), then its temporary name removed. A
    folder is renamed: ``rename`` fails onto a non-empty folder or a file; the re-check before it
    covers the rest (an empty folder made in between is all it could replace).
    """
    taken = OutputExists(
        f"{path} was created by another run while this one was writing; nothing was replaced "
        "(pass --force to replace it)"
    )
    if temporary.is_dir():
        if _occupied(path):
            raise taken
        try:
            os.rename(temporary, path)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            raise taken from exc
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise taken from exc
            raise
        return
    try:
        os.link(temporary, path, follow_symlinks=False)
    except FileExistsError as exc:
        raise taken from exc
    except OSError as exc:  # no hard links here (some network/FUSE file systems): check, then rename
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        if _occupied(path):
            raise taken from exc
        os.replace(temporary, path)
    else:
        temporary.unlink()


def _replace(temporary: Path, path: Path) -> None:
    """Publish ``temporary`` as ``path``, replacing whatever is there (``--force``)."""
    if not _occupied(path):
        os.replace(temporary, path)
        return
    old = _temporary_name(path, "old")
    os.replace(path, old)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.replace(old, path)  # put the old output back: a failed forced run keeps it
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
