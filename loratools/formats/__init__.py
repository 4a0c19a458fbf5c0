"""Adapter formats: key names and configs ↔ :class:`loratools.adapter.Adapter`. No file I/O here.

Every format module (``peft``, ``kohya``) has the same pair of functions::

    to_adapter(tensors, metadata=None, *, context=LoadContext()) -> Adapter
    from_adapter(adapter, ...) -> AdapterFiles       # tensors, metadata, config (or None)

and :data:`loratools.formats.registry.FORMATS` maps each family name (as
:mod:`loratools.formats.detect` reports it) to its module; ``io/adapter_dir.py`` loads through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # `import loratools` (and --help) stays free of torch
    import torch

__all__ = ["AdapterFiles", "LoadContext"]


class AdapterFiles(NamedTuple):
    """What a format's files hold for one adapter: ``from_adapter``'s result in every format.

    Attributes:
        tensors: the state dict under the format's key names (written as one ``.safetensors``).
        metadata: the safetensors header's ``__metadata__`` strings.
        config: the JSON file written beside the weights (PEFT's ``adapter_config.json``); None
            for a format whose file carries everything (kohya).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any] | None = None


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
