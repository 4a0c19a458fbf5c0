"""Training LoRA adapters: layers, injection, a built-in Llama-family model, data, the loop.

    from loratools.train import TrainOptions, train_adapter
    report = train_adapter("fixtures/base", "fixtures/train/copy.jsonl", "out", TrainOptions(steps=50))

Import is lazy: ``import loratools.train`` does not load torch until a name is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LoRALinear": "loratools.train.layers",
    "inject_lora": "loratools.train.inject",
    "load_lora_adapter": "loratools.train.inject",
    "to_adapter": "loratools.train.inject",
    "LlamaConfig": "loratools.train.model",
    "LlamaForCausalLM": "loratools.train.model",
    "load_model": "loratools.train.model",
    "read_examples": "loratools.train.data",
    "pack": "loratools.train.data",
    "LoopOptions": "loratools.train.options",
    "fit": "loratools.train.loop",
    "TrainOptions": "loratools.train.options",
    "TrainReport": "loratools.train.run",
    "train_adapter": "loratools.train.run",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loratools.train' has no attribute {name!r}")
