"""Reading checkpoints lazily: names, shapes and dtypes up front, one tensor at a time on demand.

A checkpoint is any of:
- a single ``.safetensors`` file;
- a model directory with ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
  exactly one other ``*.safetensors`` file;
- a PyTorch ``.bin``/``.pt`` file (or directory with ``pytorch_model.bin[.index.json]``), loaded
  only with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
Hub ids are resolved to a local snapshot by :mod:`loratools.io.resolve` before they get here.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.errors import CheckpointError, MissingKeys, UnknownFormat, list_problems
from loratools.io.buffers import BufferRing
from loratools.io.cache import exceeds_cache
from loratools.io.prefetch import prefetched
from loratools.io.quant import QuantGroup, dequantize, find_groups, logical_infos, requantize
from loratools.io.safetensors_file import (
    DuplicateKey,
    SafetensorsFile,
    StoredRange,
    TensorInfo,
    TensorSpec,
    bad_text,
    open_regular,
    unique_object,
)

__all__ = ["Checkpoint", "ShardLayout", "open_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ShardLayout:
    """One output file of a checkpoint's layout: its file name, tensors in data order, header."""

    filename: str
    specs: list[TensorSpec]
    header: bytes | None = None  # the source header, reusable verbatim when nothing changes


class Checkpoint:
    """A read-only, lazily loaded checkpoint.

    Attributes:
        path: what the user named (file or directory).
        kind: ``"safetensors"``, ``"safetensors-sharded"`` or ``"pytorch"``.
        model_dir: the directory holding config/tokenizer files to carry along, if any.
        index_name: the index file name of a sharded checkpoint, else None.
        metadata: the safetensors ``__metadata__`` of the first file (``{}`` for PyTorch).
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        files: list[Path],
        model_dir: Path | None,
        index_name: str | None = None,
    ) -> None:
        self.path, self.kind, self.files = path, kind, files
        self.model_dir, self.index_name = model_dir, index_name
        self._safetensors: dict[Path, SafetensorsFile] = {}
        self._pytorch: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            self._load_header(file)
        self.metadata: dict[str, str] = (
            dict(self._safetensors[files[0]].metadata) if kind != "pytorch" and files else {}
        )
        # quantized weights (bitsandbytes, FP8) read as one float32 tensor under their plain name;
        # ``stored`` keeps the tensors as the files hold them
        self.stored: dict[str, TensorInfo] = self._infos
        self.quantized: dict[str, QuantGroup] = {}
        if kind != "pytorch":
            self.quantized = find_groups(self._infos, self.read_stored, model_dir)
            self._infos = logical_infos(self._infos, self.quantized) if self.quantized else self._infos

    def _load_header(self, file: Path) -> None:
        if self.kind == "pytorch":
            tensors = _torch_load(file)
            for name, tensor in tensors.items():
                nbytes = tensor.numel() * tensor.element_size()
                self._infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file, 0, nbytes)
            self._pytorch.update(tensors)
            return
        st = SafetensorsFile(file)
        self._safetensors[file] = st
        for name, info in st.infos.items():
            if name in self._infos:
                raise CheckpointError(f"{file}: tensor {name!r} is also stored in {self._infos[name].file}")
            self._infos[name] = info

    # -- what is in it ----------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        """Tensor names in storage order (file by file, then by offset)."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    @property
    def num_parameters(self) -> int:
        return sum(int(torch.Size(info.shape).numel()) for info in self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    # -- reading ----------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor in its stored dtype)."""
        if name not in self._infos:
            raise MissingKeys(f"{self.path}: no tensor named {name!r}")
        if self.kind == "pytorch":
            return self._pytorch[name]
        if name in self.quantized:
            return dequantize(self.quantized[name], self.read_stored)
        return self._safetensors[self._infos[name].file].read(name)

    def get_buffered(self, name: str, buffers: BufferRing, *, drop_behind: bool = False) -> torch.Tensor:
        """:meth:`get`, with a plain safetensors tensor read into a free buffer of ``buffers``
        (see :class:`BufferRing`: no fresh pages to fault in). The tensor is the caller's until
        it drops it; only then is its memory read into again. ``drop_behind``: see :meth:`pass_reader`."""
        info = self._infos.get(name)
        file = self._safetensors.get(info.file) if info is not None and name not in self.quantized else None
        return file.read(name, buffers, drop_behind=drop_behind) if file is not None else self.get(name)

    @property
    def exceeds_cache(self) -> bool:
        """Whether one pass over the stored files is too much for the page cache
        (:func:`loratools.io.cache.exceeds_cache`): then its reads drop behind."""
        return exceeds_cache(sum(file.stat().st_size for file in self.files))

    def pass_reader(self) -> Callable[[str], torch.Tensor]:
        """``load(name)`` for one streaming pass: :meth:`get_buffered` into this pass's own
        :class:`BufferRing` (freed with it), dropping behind when the checkpoint
        :attr:`exceeds_cache` (each tensor's bytes leave the page cache once read,
        :mod:`loratools.io.cache`; a 7 B extract's system time 20 → 5 s)."""
        buffers, drop = BufferRing(), self.exceeds_cache
        return lambda name: self.get_buffered(name, buffers, drop_behind=drop)

    def requantize(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` (float32) put through ``name``'s stored quantization and read back; None when
        ``name`` is not quantized. ``requantize(name, w) − w`` is that quantization's rounding."""
        group = self.quantized.get(name)
        return None if group is None else requantize(group, w, self.read_stored)

    def requantizes(self, name: str) -> bool:
        """Whether :meth:`requantize` gives a tensor for ``name`` (asked before a float32 copy is made)."""
        return name in self.quantized

    def read_stored(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (a quantized weight's packed part, scale or state)."""
        return self._safetensors[self.stored[name].file].read(name)

    def get_raw(self, name: str) -> bytes:
        """One tensor's stored bytes, for copies that must stay bit-identical."""
        if self.kind == "pytorch" or name in self.quantized:
            tensor = self.get(name).contiguous().reshape(-1)  # a quantized weight: its float32 values
            return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        return self._safetensors[self._infos[name].file].read_raw(name)

    def stored_range(self, name: str) -> StoredRange | bytes:
        """Where a plain safetensors tensor's bytes are (a writer copies them in the kernel, see
        :func:`~loratools.io.safetensors_file.copy_range`); anything else as :meth:`get_raw`."""
        info = self._infos.get(name)
        file = self._safetensors.get(info.file) if info is not None and name not in self.quantized else None
        return file.stored_range(name) if file is not None else self.get_raw(name)

    def iter_tensors(
        self, names: Iterable[str] | None = None, prefetch: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in order, reading the next tensor while the caller works
        (through :meth:`pass_reader`)."""
        order = list(self._infos if names is None else names)
        if not prefetch:
            yield from ((name, self.get(name)) for name in order)
            return
        yield from prefetched(order, self.pass_reader())

    # -- layout, for writers that keep it ---------------------------------------------------
    def layout(self, dtype_of: dict[str, torch.dtype] | None = None) -> list[ShardLayout]:
        """This checkpoint's files as output shards, optionally with some tensors' dtypes changed.

        A file none of whose dtypes change keeps its source header bytes, so its copy is
        byte-identical.
        """
        dtype_of = dtype_of or {}
        out = []
        for file in self.files:
            infos = [info for info in self._infos.values() if info.file == file]
            specs = [TensorSpec(i.name, i.shape, dtype_of.get(i.name, i.dtype)) for i in infos]
            unchanged = all(spec.dtype == info.dtype for spec, info in zip(specs, infos, strict=True))
            # a quantized checkpoint's file keeps its header only if it holds exactly what it stores
            # (no dequantized weight, no hidden scale or state of a weight stored elsewhere)
            stored = [i for i in self.stored.values() if i.file == file]
            unchanged = unchanged and len(stored) == len(infos)
            unchanged = unchanged and not any(i.name in self.quantized for i in infos)
            header = self._safetensors[file].header if unchanged and file in self._safetensors else None
            out.append(ShardLayout(_safetensors_name(file), specs, header))
        return out


def _safetensors_name(file: Path) -> str:
    return file.name if file.suffix == ".safetensors" else file.with_suffix(".safetensors").name


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    warnings.warn(
        f"{file}: reading a PyTorch pickle checkpoint with weights_only=True; safetensors is "
        "preferred (loratools convert MODEL --to safetensors)",
        stacklevel=3,
    )
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False, i.e. running the file's code: not repeated
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        what = f" (such as {found[1]})" if found else ""
        raise CheckpointError(
            f"{file}: refused to load: it is a pickle holding Python objects beyond tensors{what}, which "
            "loratools will not execute; if you trust its source, convert it to safetensors with a "
            "trusted tool (e.g. the one that made it), and otherwise do not use it"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state_dict)")
    return {str(k): v for k, v in state.items()}


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name → shard file name), checked to be strings only."""
    try:
        with open_regular(index_path) as f:
            index = json.loads(f.read(), object_pairs_hook=unique_object)
    except DuplicateKey as exc:
        raise CheckpointError(
            f"{index_path}: not a valid index: it lists {exc.args[0]!a} twice; re-download it"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(
            f"{index_path}: not a valid index: not JSON ({why!a}); re-download it"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f'{index_path}: not a valid index: it needs a "weight_map" object of tensor name → shard file'
        )
    bad = [f"{k!a}: {v!a}"[:80] for k, v in weight_map.items() if not isinstance(v, str) or bad_text(k)]
    if bad:
        raise CheckpointError(
            f"{index_path}: not a valid index: weight_map entries must map a tensor name to a shard "
            f"file name: {list_problems(bad, 3)}"
        )
    return weight_map


def _in_hub_blobs(target: Path) -> bool:
    """``target`` is a file in a Hugging Face cache's ``models--org--name/blobs/`` folder."""
    return target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")


def _shard_path(index_path: Path, folder: Path, shard: str) -> Path:
    """The shard file named ``shard`` in ``folder``: a bare file name, and a symlink only when it
    stays inside the folder or points into a Hub cache's blobs/ (snapshots link to ../../blobs)."""
    if Path(shard).name != shard or shard in (".", "..") or bad_text(shard):
        raise CheckpointError(
            f"{index_path}: refused: shard {shard!a} points outside the model folder {folder}; "
            "an index names shards by bare file name"
        )
    candidate = folder / shard
    if candidate.is_symlink():
        target = candidate.resolve()
        if not (target.is_relative_to(folder) or _in_hub_blobs(target)):
            raise CheckpointError(
                f"{index_path}: refused: shard {shard!r} is a symlink to {target}, outside the model "
                "folder; only links into a Hugging Face cache's blobs/ are followed — copy the file in"
            )
    return candidate


def _check_index_matches_shards(index_path: Path, weight_map: dict[str, str], ckpt: Checkpoint) -> None:
    """Every tensor the index lists is stored in the shard it names, and every stored tensor is
    listed: a stale or hand-edited index would make outputs disagree with their own index."""
    stored = {name: file.name for file, st in ckpt._safetensors.items() for name in st.infos}
    if not ckpt._safetensors:  # PyTorch shards
        stored = {name: info.file.name for name, info in ckpt._infos.items()}
    absent = [name for name in weight_map if name not in stored]
    if absent:
        raise MissingKeys(f"{index_path}: tensors listed but not in their shards: {list_problems(absent)}")
    unlisted = [f"{name} (in {file})" for name, file in stored.items() if name not in weight_map]
    if unlisted:
        raise CheckpointError(
            f"{index_path}: tensors stored in the shards but missing from the index: "
            f"{list_problems(unlisted)}; the index is stale — re-download or regenerate it"
        )
    moved = [f"{n} (index: {f}, stored in {stored[n]})" for n, f in weight_map.items() if stored[n] != f]
    if moved:
        raise CheckpointError(
            f"{index_path}: tensors the index maps to the wrong shard: {list_problems(moved)}; "
            "the index is stale — re-download or regenerate it"
        )


def _open_index(index_path: Path, kind: str, named: Path) -> Checkpoint:
    """A sharded checkpoint from its index.json: every shard a bare file name in the folder (or a
    link into a Hub cache's blobs/), every shard present, and the index and the shards agreeing on
    which tensor is where. ``named`` is the path the user gave (the folder or the index itself)."""
    weight_map = _read_weight_map(index_path)
    folder = index_path.parent.resolve()
    files = [_shard_path(index_path, folder, shard) for shard in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingKeys(
            f"{index_path}: missing shard files (or not regular files): {list_problems(missing)}"
        )
    ckpt = Checkpoint(named, kind, files, index_path.parent, index_path.name)
    _check_index_matches_shards(index_path, weight_map, ckpt)
    return ckpt


def _open_directory(path: Path) -> Checkpoint:
    if (path / SAFETENSORS_INDEX).is_file():
        return _open_index(path / SAFETENSORS_INDEX, "safetensors-sharded", path)
    if (path / "model.safetensors").is_file():
        return Checkpoint(path, "safetensors", [path / "model.safetensors"], path)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return Checkpoint(path, "safetensors", candidates, path)
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates[:4])
        raise UnknownFormat(
            f"{path}: several .safetensors files ({names}) and no {SAFETENSORS_INDEX}; "
            "point at one file, or add an index"
        )
    if (path / PYTORCH_INDEX).is_file():
        return _open_index(path / PYTORCH_INDEX, "pytorch", path)
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).is_file():
            return Checkpoint(path, "pytorch", [path / name], path)
    raise UnknownFormat(f"{path}: no model weights found (expected model.safetensors or an index.json)")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local checkpoint file or model directory (see the module docstring).

    Raises:
        CheckpointError: missing, unreadable or corrupt files; unsafe index entries.
        UnknownFormat: a path that is not a checkpoint of a known kind.
    """
    path = Path(path)
    if path.is_dir():
        return _open_directory(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{path}: not a regular file (a pipe, device or socket); pass a weights file")
    if path.suffix == ".safetensors":
        return Checkpoint(path, "safetensors", [path], None)
    if path.suffix == ".gguf":  # a llama.cpp model: HF names, dequantized tensor by tensor
        from loratools.io.quant.gguf_checkpoint import GgufCheckpoint

        return GgufCheckpoint(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return Checkpoint(path, "pytorch", [path], None)
    if path.name.endswith(".index.json"):
        kind = "pytorch" if path.name == PYTORCH_INDEX else "safetensors-sharded"
        return _open_index(path, kind, path)
    raise UnknownFormat(f"{path}: not a checkpoint (expected .safetensors, .bin/.pt or a model directory)")
