"""Adapter formats: key names and configs ↔ :class:`loratools.adapter.Adapter`. No file I/O here.

Every format module (``peft``, ``kohya``) has the same pair of functions::

    to_adapter(tensors, metadata=None, *, context=LoadContext()) -> Adapter
    from_adapter(adapter, ...) -> (tensors, ...)      # what the format's files hold

and :data:`loratools.formats.registry.FORMATS` maps each family name (as
:mod:`loratools.formats.detect` reports it) to its module; ``io/adapter_dir.py`` loads through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoadContext"]


@dataclass(frozen=True)
class LoadContext:
    """What a format may need besides the tensors and the file's metadata; each format reads only
    its fields.

    Attributes:
        source: how messages name the adapter (the path the user gave).
        config: the ``adapter_config.json`` beside the weights (PEFT: required, else empty).
        base_names: the base checkpoint's tensor names (kohya: to turn ``lora_unet_a_b_c``
            back into dotted module paths).
        base_shapes: the base's tensor name → shape (PEFT ``target_parameters`` LoRA on fused
            expert tensors, :mod:`loratools.kinds.fused`).
        keep_stems: kohya without ``base_names``: name modules by their kohya stems instead of
            refusing (enough for everything that needs no base).
    """

    source: str = "adapter"
    config: Mapping[str, Any] = field(default_factory=dict)
    base_names: Sequence[str] | None = None
    base_shapes: Mapping[str, tuple[int, ...]] | None = None
    keep_stems: bool = False
