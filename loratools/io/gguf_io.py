"""GGUF files through the ``gguf`` package (extra ``gguf``): LoRA adapters out, models in.

- :func:`write_adapter_gguf` writes the llama.cpp LoRA GGUF (names and scale folding are in
  :mod:`loratools.formats.gguf`).
- :class:`GgufModel` reads a GGUF model lazily (the file is memory-mapped by ``GGUFReader``) and
  yields Hugging Face-named tensors one at a time: dequantized with ``gguf.quants`` and with
  llama.cpp's q/k row permutation undone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratools.errors import CheckpointError, MissingExtra, UnknownFormat, list_problems
from loratools.formats import gguf as names
from loratools.io.gguf_header import open_gguf_reader
from loratools.io.prefetch import prefetched
from loratools.io.safetensors_file import TensorSpec

__all__ = ["GgufModel", "read_gguf_kv", "write_adapter_gguf"]

STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# float tensors written as-is; bfloat16 goes through GGUF's BF16 type as raw 16-bit words
NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise MissingExtra("gguf", "gguf", "GGUF conversion") from exc
    return gguf


def write_adapter_gguf(
    path: Path, arch: str, alpha: float, tensors: Mapping[str, torch.Tensor], name: str | None = None
) -> None:
    """Write a llama.cpp LoRA adapter GGUF.

    Args:
        path: the file to create (the caller makes it atomic).
        arch: ``general.architecture`` (must equal the base model's, llama.cpp checks).
        alpha: ``adapter.lora.alpha``.
        tensors: ``<gguf base name>.lora_a`` (r, in) / ``.lora_b`` (out, r), float32/16 or bfloat16.
        name: ``general.name``, if any.
    """
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(names.ADAPTER_TYPE)
    writer.add_string(names.KEY_ADAPTER_TYPE, "lora")
    writer.add_float32(names.KEY_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            raw = tensor.view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(
                key, tensor.to(torch.float32 if tensor.dtype not in NUMPY_OF else tensor.dtype).numpy()
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def read_gguf_kv(reader: Any) -> dict[str, Any]:
    """A GGUFReader's key/values as plain Python values (its own ``GGUF.*`` bookkeeping dropped)."""
    return {key: _field_value(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}


class GgufModel:
    """A GGUF model file, read lazily as Hugging Face-named tensors.

    Attributes:
        path: the file.
        kv: its metadata as plain values.
        config: the Hugging Face config.json built from ``kv``.
        skipped: GGUF tensors with no Hugging Face counterpart (``rope_freqs.weight``).
        notes: what the conversion could not carry over (e.g. a tokenizer), for the report.
        dtype: output dtype; None keeps F32/F16/BF16 and turns quantized types into float32.
    """

    def __init__(self, path: Path, dtype: torch.dtype | None = None) -> None:
        self.path, self.dtype = Path(path), dtype
        self.notes: list[str] = []
        # every length and offset bounded by the file's size before gguf reads it
        self._reader = open_gguf_reader(self.path)
        self.kv = read_gguf_kv(self._reader)
        if self.kv.get(names.KEY_TYPE) == names.ADAPTER_TYPE:
            raise UnknownFormat(f"{path}: a GGUF LoRA adapter, not a model; convert models only")
        if int(self.kv.get("split.count", 1)) > 1:
            raise UnknownFormat(
                f"{path}: one part of a split GGUF ({self.kv['split.count']} files); join them first "
                "with llama.cpp's `llama-gguf-split --merge`"
            )
        tensors = {t.name: t for t in self._reader.tensors}
        self.config = names.hf_config(self.kv, has_output="output.weight" in tensors)
        self._permute = names.ARCHITECTURES[self.config["model_type"]].permute_qk
        self.skipped = sorted(n for n in tensors if n in names.NOT_IN_HF)
        mapped = {n: names.hf_name(n) for n in tensors if n not in names.NOT_IN_HF}
        unknown = sorted(n for n, hf in mapped.items() if hf is None)
        if unknown:
            raise UnknownFormat(f"{path}: GGUF tensors with no Hugging Face name: {list_problems(unknown)}")
        self._tensors = {str(hf): tensors[n] for n, hf in mapped.items()}
        scaling = sorted(k for k in self.kv if k.startswith(f"{self.kv[names.KEY_ARCH]}.rope.scaling"))
        if scaling:
            self.notes.append(
                f"RoPE scaling is not written to config.json ({', '.join(scaling)}); add rope_scaling by hand"
            )

    def tensor_types(self) -> dict[str, str]:
        """Hugging Face name → stored GGUF type name (``Q4_K``, ``F16``, …)."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def gguf_tensor(self, name: str) -> Any:
        """The reader's record of a Hugging Face-named tensor (GGUF name, type, shape, offset)."""
        return self._tensors[name]

    def specs(self) -> list[TensorSpec]:
        """Name, shape (PyTorch order) and output dtype of every tensor, in file order."""
        return [TensorSpec(name, self._shape(t), self._dtype(t)) for name, t in self._tensors.items()]

    @staticmethod
    def _shape(t: Any) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF stores ne, innermost first

    def _dtype(self, t: Any) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return STORED.get(t.tensor_type.name, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, dequantized, un-permuted and cast (a fresh CPU tensor)."""
        t = self._tensors[name]
        tensor = self._load(t)
        heads = names.qk_heads(t.name, *self._heads()) if self._permute else None
        if heads is not None:
            tensor = names.unpermute_qk(tensor, heads)
        return tensor.to(self._dtype(t)).contiguous()

    def _heads(self) -> tuple[int, int]:
        return names.model_heads(self.config)

    def _load(self, t: Any) -> torch.Tensor:
        """Read ``t``: float types bit-exact, quantized types dequantized with gguf.quants."""
        shape = self._shape(t)
        kind = t.tensor_type.name
        raw = self._read(t)
        if kind in ("F32", "F16"):
            return torch.from_numpy(raw.view(np.float32 if kind == "F32" else np.float16)).reshape(shape)
        if kind == "BF16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
        try:
            values = _gguf().quants.dequantize(raw.reshape(t.data.shape), t.tensor_type)
        except NotImplementedError as exc:
            raise UnknownFormat(
                f"{self.path}: tensor {t.name} has type {kind}, which gguf cannot dequantize"
            ) from exc
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    def _read(self, t: Any) -> np.ndarray:
        """``t``'s stored bytes, read into fresh memory rather than through the reader's memory
        map, so that resident memory is the tensor in hand, not every page of the file touched."""
        buffer = np.empty(t.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.data_offset)
            if f.readinto(buffer.data) != t.n_bytes:
                raise CheckpointError(f"{self.path}: truncated inside tensor {t.name}; re-download it")
        return buffer

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order, one at a time, reading the next while the caller writes."""
        yield from prefetched(list(self._tensors), self.get, label="gguf")

    def model_files(self) -> dict[str, str]:
        """Text files for the output folder: config.json, generation_config.json and, when the
        GGUF has a vocabulary, tokenizer.json + tokenizer_config.json. A tokenizer.json the GGUF
        carries verbatim (``tokenizer.huggingface.json``) is used as is; otherwise it is rebuilt
        from ``tokenizer.ggml.*`` with transformers' GGUF converter, when transformers is installed.
        What could not be done is appended to :attr:`notes`."""
        config = {**self.config, "torch_dtype": _dtype_name(self.dtype or self._common_dtype())}
        files = {"config.json": _json(config)}
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        if generation:
            files["generation_config.json"] = _json(generation)
        tokenizer = self.kv.get(names.KEY_HF_TOKENIZER)
        if not (isinstance(tokenizer, str) and tokenizer) and "tokenizer.ggml.tokens" in self.kv:
            tokenizer = self._rebuild_tokenizer()
        if isinstance(tokenizer, str) and tokenizer:
            files["tokenizer.json"] = tokenizer
            files["tokenizer_config.json"] = _json(self._tokenizer_config())
        elif "tokenizer.ggml.tokens" not in self.kv:
            self.notes.append(
                "the GGUF carries no tokenizer; copy the tokenizer files from the original model"
            )
        return files

    def _rebuild_tokenizer(self) -> str | None:
        """tokenizer.json from the GGUF vocabulary via transformers (optional), or None with a note."""
        try:
            from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        except ImportError:
            self.notes.append(
                "tokenizer.json not written: rebuilding it from the GGUF vocabulary needs transformers "
                "(pip install transformers), or copy it from the original model"
            )
            return None
        try:
            architecture, tokenizer, _ = get_gguf_tokenizer(str(self.path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer)
            text: str = backend.to_str()
        except (
            Exception
        ) as exc:  # an optional best effort through transformers' internals: report, don't fail
            self.notes.append(f"tokenizer.json not written: transformers could not rebuild it ({exc})")
            return None
        self.notes.append("tokenizer.json rebuilt from the GGUF vocabulary with transformers' GGUF converter")
        return text

    def _tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json: special tokens by text, BOS/EOS flags and the chat template."""
        tokens = self.kv.get("tokenizer.ggml.tokens") or []
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                           ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):  # fmt: skip
            token_id = self.kv.get(f"tokenizer.ggml.{key}")
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                config[field] = tokens[token_id]
        for field in ("add_bos_token", "add_eos_token"):
            if f"tokenizer.ggml.{field}" in self.kv:
                config[field] = bool(self.kv[f"tokenizer.ggml.{field}"])
        if "tokenizer.chat_template" in self.kv:
            config["chat_template"] = self.kv["tokenizer.chat_template"]
        return config

    def _common_dtype(self) -> torch.dtype:
        dtypes = [self._dtype(t) for t in self._tensors.values() if len(t.shape) > 1]
        return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _json(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
