"""Helpers for tests that use the real PEFT and transformers libraries as the judge of the format."""

from __future__ import annotations

from pathlib import Path

import torch

from loratools.adapter import Adapter


def load_llama(model_dir: Path):
    """transformers' LlamaForCausalLM from a fixture folder, float32, eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def tokens(batch: int = 2, length: int = 12, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def logits_with_merged_by_hand(model_dir: Path, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base with W0 + scale·B·A written into each adapted weight by hand."""
    model = load_llama(model_dir)
    state = model.state_dict()
    for module in adapter.weights:
        state[f"{module}.weight"] += adapter.delta(module)
    for name, tensor in adapter.saved_modules.items():
        state[name] = tensor.float()
    model.load_state_dict(state)
    return logits(model, ids)


@torch.no_grad()
def logits_through_peft(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_llama(model_dir), adapter_dir).eval()
    return logits(model, ids)
