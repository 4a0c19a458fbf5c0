"""bitsandbytes checkpoints (Hugging Face safetensors of QLoRA-style models), as bitsandbytes
stores and dequantizes them (``bitsandbytes/functional.py``, ``backends/default/ops.py``).

4-bit (nf4 / fp4), one group per ``<module>.weight``::

    weight                                    uint8 (n/2, 1): two 4-bit codes per byte, high nibble first
    weight.absmax                             float32 (n/blocksize,)  — or uint8 with double quantization
    weight.quant_map                          float32 (16,): the code's values
    weight.nested_absmax, .nested_quant_map   float32: absmax's own blockwise quantization (double quant)
    weight.quant_state.bitsandbytes__nf4|fp4  uint8: JSON {quant_type, blocksize, dtype, shape,
                                              nested_blocksize, nested_offset, nested_dtype}

    absmax = nested_quant_map[absmax_u8] · nested_absmax[i // nested_blocksize] + nested_offset
    W[i]   = quant_map[code_i] · absmax[i // blocksize]           (float32, then reshaped)

8-bit (LLM.int8, row-wise): ``weight`` int8 (out, in), ``SCB`` float32 (out,), ``weight_format``::

    W = weight · SCB[:, None] · (1/127)     (bitsandbytes multiplies by 7.874015718698502e-3)

Requantizing follows bitsandbytes' own quantizers: per block absmax, the code nearest to
``w / absmax`` (ties to the lower code), and for double quantization the stored ``nested_offset``
is kept (so the JSON state, and every stored shape, stays the same).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import torch

from loratools.errors import CheckpointError
from loratools.io.quant.group import QuantGroup
from loratools.io.safetensors_file import TensorInfo

STATE = "quant_state.bitsandbytes__"
INV_127 = 7.874015718698502e-3  # bitsandbytes' 1/127, as it multiplies


def find_groups(infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor]) -> list[QuantGroup]:
    """Every 4-bit and 8-bit bitsandbytes weight in ``infos`` (``read`` loads the small JSON state)."""
    groups = []
    for name, info in infos.items():
        for quant_type in ("nf4", "fp4"):
            if f"{name}.{STATE}{quant_type}" in infos:
                groups.append(_four_bit(name, quant_type, infos, read))
        scb = name.removesuffix("weight") + "SCB"
        if name.endswith("weight") and info.dtype == torch.int8 and scb in infos:
            extra = tuple(p for p in (name + "_format",) if p in infos)
            groups.append(QuantGroup(name, "bnb-int8", tuple(info.shape), (name, scb, *extra), {"scb": scb}))
    return groups


def _four_bit(
    name: str, quant_type: str, infos: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor]
) -> QuantGroup:
    state_name = f"{name}.{STATE}{quant_type}"
    try:
        state = json.loads(bytes(read(state_name).numpy().tobytes()).decode("utf-8"))
        shape = tuple(int(n) for n in state["shape"])
        blocksize = int(state["blocksize"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{infos[name].file}: {state_name} is not a bitsandbytes quantization state ({exc!r})"
        ) from exc
    nested = f"{name}.nested_absmax" in infos
    parts = [name, f"{name}.absmax", f"{name}.quant_map"]
    parts += [f"{name}.nested_absmax", f"{name}.nested_quant_map"] if nested else []
    missing = [p for p in parts if p not in infos]
    if missing:
        raise CheckpointError(f"{infos[name].file}: bitsandbytes weight {name} lacks {', '.join(missing)}")
    if math.prod(shape) > 2 * infos[name].shape[0] * math.prod(infos[name].shape[1:]):
        raise CheckpointError(
            f"{infos[name].file}: {name} holds fewer 4-bit codes than its shape {list(shape)}"
        )
    params = {"blocksize": blocksize, "nested": nested, "state": state}
    return QuantGroup(name, f"bnb-{quant_type}", shape, (*parts, state_name), params)


def dequantize(group: QuantGroup, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The float32 weight, computed as bitsandbytes computes it before its final cast."""
    if group.kind == "bnb-int8":
        return read(group.name) * read(group.params["scb"]).view(-1, 1) * INV_127
    n = math.prod(group.shape)
    packed = read(group.name).view(torch.uint8).reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0xF
    values = read(f"{group.name}.quant_map").float()[codes[:n]]
    return _blockwise(values, _absmax(group, read), group.params["blocksize"]).reshape(group.shape)


def _absmax(group: QuantGroup, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    absmax = read(f"{group.name}.absmax")
    if not group.params["nested"]:
        return absmax.float()
    state = group.params["state"]
    code = read(f"{group.name}.nested_quant_map").float()
    values = code[absmax.reshape(-1).long()]
    scaled = _blockwise(values, read(f"{group.name}.nested_absmax").float(), int(state["nested_blocksize"]))
    return scaled + float(state["nested_offset"])


def _blockwise(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] · absmax[i // blocksize]`` (float32); the last block may be partial."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


def quantize(
    group: QuantGroup, w: torch.Tensor, read: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``w`` (float32, ``group.shape``) back to this group's stored tensors (same names, shapes, dtypes)."""
    if group.kind == "bnb-int8":
        stats = w.abs().amax(dim=1)
        weight = torch.round(w * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
        out = {group.name: weight, group.params["scb"]: stats.to(read(group.params["scb"]).dtype)}
    else:
        out = _quantize_4bit(group, w.reshape(-1), read)
    out.update({part: read(part) for part in group.parts if part not in out})
    return out


def _quantize_4bit(
    group: QuantGroup, flat: torch.Tensor, read: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    name = group.name
    code = read(f"{name}.quant_map").float()
    indices, absmax = _nearest_codes(flat, code, group.params["blocksize"])
    if indices.numel() % 2:
        indices = torch.nn.functional.pad(indices, (0, 1))
    packed = ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)
    stored = read(name)
    out = {name: packed.view(stored.dtype).reshape(stored.shape)}
    if not group.params["nested"]:
        out[f"{name}.absmax"] = absmax.to(read(f"{name}.absmax").dtype)
        return out
    state = group.params["state"]
    nested_code = read(f"{name}.nested_quant_map").float()
    shifted = absmax - float(state["nested_offset"])
    q, nested_absmax = _nearest_codes(shifted, nested_code, int(state["nested_blocksize"]))
    out[f"{name}.absmax"] = q.to(torch.uint8)
    out[f"{name}.nested_absmax"] = nested_absmax.to(read(f"{name}.nested_absmax").dtype)
    return out


def _nearest_codes(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise quantizer: per block ``absmax = max|x|``, then the index of the code
    value nearest to ``clamp(x · (1/absmax), −1, 1)`` (bucketize on the sorted codes' midpoints).

    Returns:
        indices into ``code`` (int64, like ``flat``) and absmax (float32, one per block).
    """
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = torch.clamp(flat[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:
        tail = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return order[torch.bucketize(scaled, bounds)], absmax
