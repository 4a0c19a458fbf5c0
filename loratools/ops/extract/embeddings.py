"""``extract --embeddings``: what happens to embeddings and lm_head, and tied embeddings.

With ``--embeddings lora`` an input embedding E (vocab, dim) and lm_head (vocab, dim) are
factored like any module, ``ΔE ≈ s·B@A``; the input embedding is written in PEFT's embedding
layout (:mod:`loratools.kinds.embedding`). A model with tied embeddings stores one matrix for both
(no ``lm_head.weight`` in the checkpoint), so one delta changes the input and the output side:

- merged (loratools ``merge``): the tied lm_head reads the merged embedding — the fine-tune's
  logits, nothing more to do;
- unmerged in PEFT: lm_head reads the base weight unless the config asks PEFT to tie the adapter
  to it too, so the adapter is written with ``ensure_weight_tying: true`` (checked in
  tests/ops/test_embeddings.py: PEFT's logits then match the fine-tune's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from loratools.kinds import embedding

OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")


def tied_embeddings(names: Iterable[str]) -> list[str]:
    """Input embedding modules of a checkpoint with no output head of its own (tied embeddings).

    Args:
        names: every tensor name of the checkpoint (base and fine-tune together).
    """
    names = list(names)
    if any(OUTPUT_HEAD.search(n) for n in names):
        return []
    modules = {n.removesuffix(".weight") for n in names if n.endswith(".weight")}
    return sorted(m for m in modules if embedding.is_lookup(m))


def tying_config(tied: list[str], adapted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"ensure_weight_tying": True}`` when a tied input embedding gets LoRA factors, else ``{}``."""
    return {"ensure_weight_tying": True} if any(m in adapted for m in tied) else {}
