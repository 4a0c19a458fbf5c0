"""Planning, from the headers alone: which tensors to factor, compare or carry, and the output dtype."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from loratools.errors import LoratoolsError, ShapeMismatch, UnknownFormat, list_problems, name_summary
from loratools.formats.detect import looks_like_adapter
from loratools.ops.extract.options import ExtractOptions
from loratools.ops.moe import is_fused_expert, is_router

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
    if is_fused_expert(name, shape) and options.targets_module(name):
        return "lora"  # (E, p, q): one LoRA per expert, written as PEFT target_parameters
    if len(shape) == 2 and name.endswith(".weight") and options.targets_module(module):
        return "lora"
    return "other"


def plan_extraction(base: TensorSource, finetuned: TensorSource, options: ExtractOptions) -> ExtractPlan:
    """Match tensors by name, classify them, and check shapes, before reading any data.

    Raises:
        ShapeMismatch: tensors whose shapes differ (all listed), except embeddings with
            ``embeddings="full"``; or no tensor selected for LoRA.
    """
    _refuse_adapters(base, finetuned)
    base_names = set(base.names())
    items, bad = [], []
    for name in finetuned.names():
        if name not in base_names:
            continue
        shape, base_shape = tuple(finetuned.info(name).shape), tuple(base.info(name).shape)
        kind = _kind(name, shape, options)
        resized = shape != base_shape
        if resized and EMBEDDING.search(name) and options.embedding_mode == "lora":
            kind = "embedding"  # a grown vocabulary: no LoRA fits both shapes, so carried whole
        if resized and not (kind == "embedding" and options.embedding_mode != "skip"):
            bad.append(f"{name} {list(base_shape)} → {list(shape)}")
        items.append(Item(name, kind, shape, resized))
    if bad:
        raise ShapeMismatch(
            f"base and fine-tune shapes differ: {list_problems(bad)}; a grown vocabulary is carried "
            "whole with --embeddings full or lora (--include-embeddings; resize the base's embeddings "
            "before loading, or merge), other tensors cannot be"
        )
    lora = [item for item in items if item.kind == "lora"]
    if not lora:
        raise _nothing_to_factor(base, finetuned, items, options)
    dtype = options.dtype or _float_dtype(finetuned.info(lora[0].name).dtype)
    ft_names = set(finetuned.names())
    only_base = [n for n in base.names() if n not in ft_names]
    only_ft = [n for n in finetuned.names() if n not in base_names]
    return ExtractPlan(items, only_base, only_ft, dtype)


def _refuse_adapters(base: TensorSource, finetuned: TensorSource) -> None:
    """extract takes two full checkpoints; an adapter in either place is named, with the call meant."""
    first, second = (_mostly_adapter(source.names()) for source in (base, finetuned))
    if not (first or second):
        return
    base_path, ft_path = (
        str(getattr(source, "path", name)) for source, name in ((base, "BASE"), (finetuned, "FINETUNED"))
    )
    if first and not second:
        raise UnknownFormat(
            f"the first argument is an adapter ({base_path}) and {ft_path} a checkpoint; extract takes two "
            f"full checkpoints, BASE FINETUNED; to merge the adapter, did you mean `loratools merge {ft_path} {base_path}`?"
        )
    adapter = ft_path if second else base_path
    raise UnknownFormat(
        f"{adapter} is an adapter, not a checkpoint; extract makes an adapter from a full fine-tune "
        "(BASE FINETUNED); to bake an adapter into a base use `loratools merge BASE ADAPTER`, to re-rank one "
        "`loratools resize`"
    )


def _mostly_adapter(names: list[str]) -> bool:
    """At least half the tensors carry adapter key parts (``lora_A``, ``lora_down``, ``hada_w1_a``, …):
    one odd name in a full checkpoint does not make it an adapter."""
    return 2 * sum(looks_like_adapter([name]) for name in names) >= len(names) > 0


def _nothing_to_factor(
    base: TensorSource, finetuned: TensorSource, items: list[Item], options: ExtractOptions
) -> LoratoolsError:
    """The error when no tensor is selected for LoRA, saying which of three reasons it is."""
    shared = [item.name for item in items if len(item.shape) == 2 and item.name.endswith(".weight")]
    if not shared:
        return LoratoolsError(
            "base and fine-tune share no 2-D weight, so there is nothing to extract: the base has "
            f"{name_summary(_matrices(base))}, the fine-tune {name_summary(_matrices(finetuned))}; "
            "is the second checkpoint a fine-tune of the first?"
        )
    if options.targets is None:
        return LoratoolsError(
            f"the only 2-D weights base and fine-tune share are embeddings/lm_head ({name_summary(shared)}); "
            "factor them with --embeddings lora"
        )
    return LoratoolsError(
        f"--targets {','.join(options.targets)} selects no 2-D weight: none of the "
        f"{name_summary(shared, noun='shared 2-D weight')} matches; pass leaf names (q_proj) or a regex "
        "over module paths"
    )


def _matrices(source: TensorSource) -> list[str]:
    """The 2-D ``.weight`` tensors of a checkpoint (every tensor if it has none)."""
    names = source.names()
    return [n for n in names if n.endswith(".weight") and len(source.info(n).shape) == 2] or names


def size_warnings(reports: list[Any], options: ExtractOptions) -> list[str]:
    """Warnings about ranks that defeat the point of a LoRA.

    ``-r`` above min(d, k) is capped there (the SVD has no more singular values), and a rank with
    r·(d + k) ≥ d·k stores at least as many numbers as the dense weight.

    Args:
        reports: the factored modules (``name``, ``shape`` (d, k), ``rank``).
        options: the rank rule.
    """
    warnings = []
    if options.rank is not None:
        capped = [r for r in reports if options.rank > min(r.shape)]
        if capped:
            examples = ", ".join(f"{r.name} {r.shape[0]}×{r.shape[1]} → {min(r.shape)}" for r in capped[:3])
            warnings.append(
                f"-r {options.rank} is more than {len(capped)} module(s) can hold; their rank is capped at "
                f"min(d, k) ({examples}{', …' if len(capped) > 3 else ''})"
            )
    big = [r for r in reports if r.rank * sum(r.shape) >= r.shape[0] * r.shape[1]]
    if big:
        examples = ", ".join(f"{r.name} {r.shape[0]}×{r.shape[1]} at rank {r.rank}" for r in big[:3])
        warnings.append(
            f"{len(big)} module(s) get factors no smaller than their dense weight, r·(d+k) ≥ d·k "
            f"({examples}{', …' if len(big) > 3 else ''}); lower the rank (-r, --energy, --max-rank)"
        )
    return warnings


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
