"""Planning, from the headers alone: which tensors to factor, compare or carry, and the output dtype."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.moe import is_router

EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|lm_head)(\.|$)")


class TensorSource(Protocol):
    """What extraction reads from a checkpoint (:class:`loratools.io.checkpoint.Checkpoint`)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> Any: ...  # has .shape and .dtype

    def iter_tensors(self, names: list[str], prefetch: bool = True) -> Iterator[tuple[str, torch.Tensor]]: ...


Kind = Literal["lora", "embedding", "other"]


@dataclass(frozen=True)
class Item:
    """One tensor present in both checkpoints. ``kind``: factor it, or compare (and maybe carry) it."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    resized: bool = False  # an embedding whose fine-tune shape differs (grown vocabulary)


@dataclass(frozen=True)
class ExtractPlan:
    """What :func:`extract` will do, known from the headers alone.

    Attributes:
        items: tensors in both checkpoints, in the fine-tune's storage order.
        only_in_base: tensor names the fine-tune lacks.
        only_in_finetuned: tensor names the base lacks (new modules; not carried).
        dtype: the output dtype.
    """

    items: list[Item]
    only_in_base: list[str]
    only_in_finetuned: list[str]
    dtype: torch.dtype

    @property
    def lora_items(self) -> list[Item]:
        return [item for item in self.items if item.kind == "lora"]


def _kind(name: str, shape: tuple[int, ...], options: ExtractOptions) -> Kind:
    module = name.rsplit(".", 1)[0]
    if EMBEDDING.search(module):
        lora = options.embedding_mode == "lora" and len(shape) == 2 and name.endswith(".weight")
        return "lora" if lora else "embedding"
    if is_router(name) and options.targets is None:
        return "other"  # a router is small: carried whole when it changed (ops/extract/experts.py)
    if len(shape) == 2 and name.endswith(".weight") and options.targets_module(module):
        return "lora"
    return "other"


def plan_extraction(base: TensorSource, finetuned: TensorSource, options: ExtractOptions) -> ExtractPlan:
    """Match tensors by name, classify them, and check shapes, before reading any data.

    Raises:
        ShapeMismatch: tensors whose shapes differ (all listed), except embeddings with
            ``embeddings="full"``; or no tensor selected for LoRA.
    """
    base_names = set(base.names())
    items, bad = [], []
    for name in finetuned.names():
        if name not in base_names:
            continue
        shape, base_shape = tuple(finetuned.info(name).shape), tuple(base.info(name).shape)
        kind = _kind(name, shape, options)
        resized = shape != base_shape
        if resized and not (kind == "embedding" and options.embedding_mode == "full"):
            bad.append(f"{name} {list(base_shape)} → {list(shape)}")
        items.append(Item(name, kind, shape, resized))
    if bad:
        raise ShapeMismatch(
            f"base and fine-tune shapes differ: {list_problems(bad)}; a grown vocabulary is carried "
            "whole with --embeddings full (--include-embeddings; resize the base's embeddings before loading), "
            "other tensors cannot be"
        )
    lora = [item for item in items if item.kind == "lora"]
    if not lora:
        raise LoratoolsError(
            f"no 2-D weight shared by base and fine-tune matches --targets {options.targets}; "
            "pass leaf names (q_proj) or a regex over module paths"
        )
    dtype = options.dtype or _float_dtype(finetuned.info(lora[0].name).dtype)
    ft_names = set(finetuned.names())
    only_base = [n for n in base.names() if n not in ft_names]
    only_ft = [n for n in finetuned.names() if n not in base_names]
    return ExtractPlan(items, only_base, only_ft, dtype)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
