"""Embedding LoRA: the same ``s·B@A`` update, stored transposed by PEFT and llama.cpp.

An embedding weight E is (num_embeddings, dim) and a token t reads row ``E[t]``. loratools keeps
an embedding module's factors in that layout, like any module (:class:`~loratools.adapter.LoraWeight`
with ``embedding=True``)::

    ΔE = s · B @ A,   B: (num_embeddings, r),  A: (r, dim)

so merge, spectrum, combine and resize need nothing special. Only files differ:

- PEFT (``peft/tuners/lora/layer.py``, class ``Embedding``) stores ``lora_embedding_A`` (r,
  num_embeddings) and ``lora_embedding_B`` (dim, r), keys without ``.weight``, and computes
  ``ΔE = s · (B_peft @ A_peft)ᵀ``: so ``A_peft = Bᵀ`` and ``B_peft = Aᵀ``.
- llama.cpp (``llm_build_inp_embd``; ``llama-adapter.cpp`` checks "A and B are flipped") stores
  ``token_embd.weight.lora_a`` as (num_embeddings, r) — it gathers token rows from it — and
  ``.lora_b`` as (dim, r), and adds ``alpha/r · lora_b @ lora_a[t]``: so ``lora_a = B`` and
  ``lora_b = Aᵀ``, with r read from lora_b as for every other tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from loratools.adapter import LoraWeight
from loratools.errors import UnknownFormat, list_problems

__all__ = ["LOOKUP", "PEFT_KEY", "from_peft", "gguf_factors", "is_lookup", "refuse_embeddings", "to_peft"]

# modules that are looked up by token id (nn.Embedding); lm_head/embed_out are linear layers
LOOKUP = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings)$")
# ``<module>.lora_embedding_A`` / ``_B``, optionally followed by an adapter name (``.default``)
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?$")


def is_lookup(module: str) -> bool:
    """Whether ``module`` (a path such as ``model.embed_tokens``) is an input embedding by its name."""
    return LOOKUP.search(module) is not None


def from_peft(a_peft: torch.Tensor, b_peft: torch.Tensor, alpha: float, use_rslora: bool) -> LoraWeight:
    """PEFT's ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (dim, r) → a LoraWeight
    with B (num_embeddings, r) = A_peftᵀ and A (r, dim) = B_peftᵀ.

    Raises:
        ValueError: the two do not share a rank.
    """
    return LoraWeight(b_peft.T.contiguous(), a_peft.T.contiguous(), alpha, use_rslora, embedding=True)


def to_peft(weight: LoraWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_embedding_A, lora_embedding_B)`` = (Bᵀ (r, num_embeddings), Aᵀ (dim, r))."""
    return weight.b.T.contiguous(), weight.a.T.contiguous()


def gguf_factors(weight: LoraWeight, b_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``(token_embd.weight.lora_a, .lora_b)`` = (B (num_embeddings, r), ``b_factor``·Aᵀ (dim, r)).

    Args:
        weight: an embedding module's factors.
        b_factor: the scale correction every GGUF module folds into its lora_b (1 keeps it exact).
    """
    lora_b = weight.a.T
    if b_factor != 1.0:
        lora_b = (lora_b.float() * b_factor).to(weight.a.dtype)
    return weight.b.contiguous(), lora_b.contiguous()


def refuse_embeddings(weights: Mapping[str, Any], target: str) -> None:
    """Raise when ``target`` (a format's name) has no layout for embedding LoRA.

    Raises:
        UnknownFormat: the embedding modules, named, and where they can go instead.
    """
    names = sorted(m for m, w in weights.items() if getattr(w, "embedding", False))
    if names:
        raise UnknownFormat(
            f"{target} files have no layout for embedding LoRA ({list_problems(names)}): a {target} reader "
            "would apply it as a linear layer; convert to PEFT or GGUF instead"
        )
