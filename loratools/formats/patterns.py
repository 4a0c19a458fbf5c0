"""Per-module values written as one global value plus exceptions, as every format stores them:
PEFT's ``r``/``lora_alpha`` + ``rank_pattern``/``alpha_pattern``, kohya's ``ss_network_dim`` /
``ss_network_alpha``, GGUF's one ``adapter.lora.alpha``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["most_common"]

T = TypeVar("T")


def most_common(values: Iterable[T], fallback: Any) -> T | Any:
    """The most frequent value, ties to the largest, so the result does not depend on module
    order; ``fallback`` when there are none. The global value is this one, so the fewest modules
    need a pattern entry."""
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value)) if counts else fallback
