"""A GGUF model file as a :class:`~loratools.io.checkpoint.Checkpoint`: Hugging Face names,
tensors dequantized one at a time (float32 for block types, F16/BF16/F32 as stored), llama.cpp's
q/k row permutation undone — so every command that takes a base takes a ``.gguf`` too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from loratools.io.checkpoint import Checkpoint, ShardLayout
from loratools.io.gguf_io import GgufModel, _gguf
from loratools.io.quant import gguf_types
from loratools.io.quant.gguf_types import WRITE
from loratools.io.safetensors_file import TensorInfo, TensorSpec


class GgufCheckpoint(Checkpoint):
    """Read-only view of a GGUF model (see :class:`~loratools.io.gguf_io.GgufModel`).

    Attributes:
        model: the underlying reader (its ``kv`` metadata, ``config`` and tensor types).
        tensor_types: Hugging Face name → GGUF type name (``Q4_K``, ``F16``, …).
    """

    def __init__(self, path: Path) -> None:
        self.model = GgufModel(path)
        self.path, self.kind, self.files = Path(path), "gguf", [Path(path)]
        self.model_dir, self.index_name = None, None
        self.metadata = {"format": "pt"}
        self._safetensors, self._pytorch = {}, {}
        self._infos = {
            s.name: TensorInfo(s.name, s.shape, s.dtype, self.path, 0, 0) for s in self.model.specs()
        }
        self.stored, self.quantized = self._infos, {}
        self.tensor_types = self.model.tensor_types()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._infos:
            return super().get(name)  # raises MissingKeys
        return self.model.get(name)

    def get_raw(self, name: str) -> bytes:
        tensor = self.get(name).contiguous().reshape(-1)
        return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""

    def layout(self, dtype_of: dict[str, torch.dtype] | None = None) -> list[ShardLayout]:
        dtype_of = dtype_of or {}
        specs = [TensorSpec(i.name, i.shape, dtype_of.get(i.name, i.dtype)) for i in self._infos.values()]
        return [ShardLayout("model.safetensors", specs, None)]

    def requantize(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` (float32, Hugging Face layout) through ``name``'s GGUF type and back; None for F32
        and for types loratools cannot quantize (k-quants). Blocks run along rows, so llama.cpp's
        q/k row permutation does not change the result."""
        if not self.requantizes(name):
            return None
        kind = self.tensor_types[name]
        gguf = _gguf()
        qtype = gguf.GGMLQuantizationType[kind]
        stored = gguf_types.quantize(gguf, w.numpy(), qtype)
        raw = np.ascontiguousarray(stored).reshape(-1).view(np.uint8).reshape(w.shape[0], -1)
        return torch.from_numpy(gguf_types.dequantize(gguf, raw, qtype)).reshape(w.shape)

    def requantizes(self, name: str) -> bool:
        """Whether :meth:`requantize` gives a tensor for ``name``: a type loratools writes, not F32."""
        kind = self.tensor_types.get(name)
        return kind in WRITE and kind != "F32"

    def write_model_files(self, folder: Path, dtype: torch.dtype | None) -> list[str]:
        """config.json, generation_config.json and, when the GGUF has one, the tokenizer, built
        from the GGUF's metadata into ``folder`` (a float output of a GGUF base); ``dtype``: the
        weights' dtype for config.json (None: float32, what dequantized tensors are)."""
        files = self.model.model_files()
        config = json.loads(files["config.json"])
        config["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        files["config.json"] = json.dumps(config, indent=2) + "\n"
        for name, text in files.items():
            (folder / name).write_text(text)
        return sorted(files)
