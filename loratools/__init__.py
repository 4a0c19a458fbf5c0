"""loratools: LoRA adapters — extract, merge, inspect, combine, convert, train, publish.

The library mirrors the command line: :func:`load_adapter` / :func:`save_adapter` and
:func:`open_checkpoint` for I/O, :mod:`loratools.linalg` for the math, :mod:`loratools.ops` for
whole-model operations. Imports are lazy, so ``import loratools`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": "loratools.adapter",
    "LoraWeight": "loratools.adapter",
    "lora_scale": "loratools.adapter",
    "LoratoolsError": "loratools.errors",
    "open_checkpoint": "loratools.io.checkpoint",
    "load_adapter": "loratools.io.adapter_dir",
    "save_adapter": "loratools.io.adapter_dir",
    "push": "loratools.hub",
    "pull": "loratools.hub",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")
