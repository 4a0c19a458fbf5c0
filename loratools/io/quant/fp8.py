"""FP8 checkpoints: float8 e4m3/e5m2 weights with per-tensor, per-channel or block scales.

Stored (DeepSeek-V3/R1, Qwen3-FP8: ``weight_scale_inv``; compressed-tensors/FBGEMM: ``weight_scale``)::

    weight            float8_e4m3fn | float8_e5m2   (out, in)
    weight_scale_inv  float32  (⌈out/bo⌉, ⌈in/bi⌉) block scales, bo = bi = 128 usually
                      or () / (1,) per tensor, or (out,) / (out, 1) per output channel
    input_scale       optional static activation scale (kept for FP8 output, hidden otherwise)

Both scale names multiply: ``W = float32(weight) · scale`` broadcast over each block (DeepSeek's
``weight_dequant``). Requantizing recomputes the scales: ``scale = amax / fp8_max`` per block
(fp8_max = 448 for e4m3fn, 57344 for e5m2) and ``weight = fp8(W / scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from loratools.errors import CheckpointError
from loratools.io.quant.group import QuantGroup
from loratools.io.safetensors_file import TensorInfo

FP8 = {torch.float8_e4m3fn: "fp8-e4m3fn", torch.float8_e5m2: "fp8-e5m2"}
DTYPE_OF = {kind: dtype for dtype, kind in FP8.items()}
SCALE_SUFFIXES = ("_scale_inv", "_scale")
DEFAULT_BLOCK = 128


def find_groups(infos: Mapping[str, TensorInfo], block: tuple[int, int] | None = None) -> list[QuantGroup]:
    """Every FP8 weight with its scale. ``block``: ``weight_block_size`` from config.json, if any.

    Raises:
        CheckpointError: an FP8 weight without a scale, or a scale that fits no known layout.
    """
    groups = []
    for name, info in infos.items():
        if info.dtype not in FP8:
            continue
        scale = next((name + s for s in SCALE_SUFFIXES if name + s in infos), None)
        if scale is None:
            raise CheckpointError(
                f"{info.file}: FP8 tensor {name} has no {name}_scale_inv or {name}_scale beside it; "
                "loratools cannot dequantize it"
            )
        prefix = name.removesuffix("weight")
        extra = tuple(p for p in (prefix + "input_scale",) if p in infos and name.endswith("weight"))
        mode, size = _layout(info, infos[scale].shape, block)
        params = {"scale": scale, "mode": mode, "block": size}
        groups.append(QuantGroup(name, FP8[info.dtype], tuple(info.shape), (name, scale, *extra), params))
    return groups


def _layout(
    info: TensorInfo, scale_shape: tuple[int, ...], block: tuple[int, int] | None
) -> tuple[str, tuple[int, int]]:
    """``("tensor"|"channel"|"block", (bo, bi))`` from the scale's shape."""
    out, inp = (info.shape[0], math.prod(info.shape[1:])) if info.shape else (1, 1)
    if math.prod(scale_shape) == 1:
        return "tensor", (out, inp)
    if tuple(scale_shape) in ((out,), (out, 1)) and len(info.shape) == 2:
        return "channel", (1, inp)
    for bo, bi in ([block] if block else []) + [(DEFAULT_BLOCK, DEFAULT_BLOCK)]:
        if len(info.shape) == 2 and tuple(scale_shape) == (-(-out // bo), -(-inp // bi)):
            return "block", (bo, bi)
    raise CheckpointError(
        f"{info.file}: scale of FP8 tensor {info.name} is {list(scale_shape)}, which fits neither a "
        f"per-tensor, per-channel nor a block layout of {list(info.shape)}; set quantization_config."
        "weight_block_size in config.json"
    )


def expand(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Block scales (⌈out/bo⌉, ⌈in/bi⌉) → one scale per element (out, in)."""
    bo, bi = block
    return scale.repeat_interleave(bo, 0)[: shape[0]].repeat_interleave(bi, 1)[:, : shape[1]]


def dequantize(group: QuantGroup, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``W = float32(weight) · scale`` (float32, ``group.shape``)."""
    weight = read(group.name).to(torch.float32)
    scale = read(group.params["scale"]).to(torch.float32)
    mode = group.params["mode"]
    if mode == "tensor":
        return weight.mul_(scale.reshape(()))
    if mode == "channel":
        return weight.mul_(scale.reshape(-1, 1))
    return weight.mul_(expand(scale, group.shape, group.params["block"]))


def quantize(
    group: QuantGroup, w: torch.Tensor, read: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``w`` (float32) back to this group's stored tensors, with scales recomputed from ``w``.

    ``scale = amax / fp8_max`` per block (1 for an all-zero block), ``weight = fp8(w / scale)``;
    other parts (``input_scale``) are returned unchanged.
    """
    dtype = DTYPE_OF[group.kind]
    top = torch.finfo(dtype).max
    stored_scale = read(group.params["scale"])
    mode, (bo, bi) = group.params["mode"], group.params["block"]
    if mode == "tensor":
        amax = w.abs().amax()
    elif mode == "channel":
        amax = w.abs().amax(dim=1)
    else:
        amax = _block_amax(w, bo, bi)
    # the scale as it will be stored; the weight is divided by exactly that value
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax)).to(stored_scale.dtype)
    if mode == "tensor":
        per_element = scale.float().reshape(())
    elif mode == "channel":
        per_element = scale.float().reshape(-1, 1)
    else:
        per_element = expand(scale.float(), group.shape, (bo, bi))
    weight = (w / per_element).clamp_(-top, top).to(dtype)
    out = {group.name: weight, group.params["scale"]: scale.reshape(stored_scale.shape)}
    out.update({part: read(part) for part in group.parts if part not in out})
    return out


def _block_amax(w: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """max |w| over each bo×bi block (the last blocks may be partial): (⌈out/bo⌉, ⌈in/bi⌉)."""
    out, inp = w.shape
    padded = torch.nn.functional.pad(w.abs(), (0, -inp % bi, 0, -out % bo))
    grid = padded.reshape(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi)
    return grid.amax(dim=(1, 3))
