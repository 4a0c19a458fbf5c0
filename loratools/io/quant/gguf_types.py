"""GGUF tensor types: which ones loratools reads and which it can write back.

Reading dequantizes with ``gguf.quants.dequantize`` (the reference implementation of llama.cpp's
block formats, vectorised in numpy): F32/F16/BF16 bit-exact, and the block types Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1 (32 weights per block, one f16 scale d, ``W = d·q`` or ``d·q + m``) and the
k-quants Q2_K–Q6_K (256-weight super-blocks with 6/8-bit sub-block scales).

Writing (``merge --keep-quantization``) needs a quantizer: ``gguf.quants.quantize`` for
F32/F16/BF16 and the 32-weight block types, :mod:`.kquants` (llama.cpp's reference quantizers in
numpy) for Q4_K, Q5_K and Q6_K. Q2_K and Q3_K are read but not written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loratools.io.quant import kquants

READ = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WRITE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def dequantize(gguf: Any, raw: np.ndarray, tensor_type: Any) -> np.ndarray:
    """Stored bytes (rows, bytes per row) of ``tensor_type`` → float32 (rows, columns)."""
    return np.ascontiguousarray(gguf.quants.dequantize(raw, tensor_type), dtype=np.float32)


def quantize(gguf: Any, values: np.ndarray, tensor_type: Any) -> np.ndarray:
    """float32 (rows, columns) → the stored array of ``tensor_type`` (what GGUFWriter writes)."""
    name = tensor_type.name
    if name == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if name == "F16":
        return values.astype(np.float16)
    if name in kquants.BLOCK_BYTES:
        return kquants.quantize(values, name)
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(values, np.float32), tensor_type))
