"""One quantized weight as a checkpoint stores it: the stored tensors that make it, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QuantGroup:
    """A quantized weight: its plain name and shape, and the stored tensors it is made of.

    Attributes:
        name: the plain tensor name readers see (``...q_proj.weight``).
        kind: the scheme, e.g. ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``, ``fp8-e4m3fn``.
        shape: the dequantized shape (out, in).
        parts: stored tensor names, the packed weight first, then its scales and metadata.
        params: scheme details read from the checkpoint (block sizes, scale names, JSON state).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    parts: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False)
