"""Merging a fine-tune with a grown vocabulary: the base's embedding and lm_head grow with it.

An adapter extracted from a fine-tune that added tokens carries its embedding (V + n, dim) and
lm_head (V + n, dim) whole (``modules_to_save``), while the base has V rows. Merging writes the
adapter's matrices in place of the base's — the output tensors have V + n rows — and then fixes
what describes the shapes: config.json ``vocab_size``, and the byte count of a copied shard index.
The fine-tune's tokenizer (which knows the new tokens) is copied when given (``merge --tokenizer``).
This module decides what may grow; the files are rewritten by :mod:`loratools.io.model_dir`.

Only growth of embeddings and heads by rows is allowed: any other shape change is still a misfit,
and so is a LoRA from another adapter on a tensor that this merge grows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["grows", "lora_on_grown", "restore_base_layer"]

GROWABLE = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|word_embeddings|lm_head)\.weight$")


def grows(name: str, new: tuple[int, ...], old: tuple[int, ...]) -> bool:
    """Whether a replacement of shape ``new`` for base tensor ``name`` of shape ``old`` is a grown
    vocabulary: an embedding or head, 2-D, same width, more rows."""
    return bool(GROWABLE.search(name)) and len(new) == len(old) == 2 and new[1] == old[1] and new[0] > old[0]


def lora_on_grown(updates: Mapping[str, Any], infos: Mapping[str, Any]) -> list[str]:
    """Problems: LoRA factors (made for the base's rows) on a tensor that a replacement grows."""
    problems = []
    for name, update in updates.items():
        tensor = getattr(update, "replacement", None)
        if tensor is None or name not in infos or not getattr(update, "loras", None):
            continue
        if tuple(tensor.shape) != tuple(infos[name].shape):
            problems.append(
                f"{name}: an adapter grows it to {list(tensor.shape)} while another adds LoRA factors for "
                f"{list(infos[name].shape)}; merge them in two steps"
            )
    return problems


def restore_base_layer(update: Any, copy: Any, adapter: Any, name: str) -> None:
    """Unmerge/swap of an adapter that carries PEFT's copy of a base layer under its LoRA
    (``<module>.base_layer.weight``, read as a replacement of ``<module>.weight``).

    Merging it wrote ``copy + s·B@A``; the model without it is the copy, so the copy replaces the
    tensor and this adapter's own LoRA term on it is dropped (not subtracted).

    Args:
        update: the tensor's :class:`~loratools.ops.merge.terms.TensorUpdate`.
        copy: the base-layer copy.
        adapter: the adapter being removed.
        name: the copy's tensor name in the adapter (``<module>.weight``).
    """
    lora = adapter.weights[name.removesuffix(".weight")]
    update.loras = [term for term in update.loras if term[0] is not lora]
    if update.replacement is None:  # a swap's added adapter may bring its own copy: that one wins
        update.replacement = copy
