"""llama.cpp GGUF names, for Llama-family models: key tables and pure mappings (no gguf import here).

Tensor names (``gguf.TensorNameMap`` for ``MODEL_ARCH.LLAMA``; checked against it in the tests)::

    model.embed_tokens.weight               token_embd.weight
    model.layers.N.self_attn.q_proj.weight  blk.N.attn_q.weight       (and k, v; o → attn_output)
    model.layers.N.mlp.gate_proj.weight     blk.N.ffn_gate.weight     (and up, down)
    model.layers.N.input_layernorm.weight   blk.N.attn_norm.weight
    model.norm.weight / lm_head.weight      output_norm.weight / output.weight

llama.cpp's converter permutes the rows of q_proj and k_proj for ``llama`` models (its rotary
embedding pairs neighbouring dimensions, Hugging Face's pairs the two halves of each head)::

    permute(W, n) = W.reshape(n, 2, d/(2n), …).swapaxes(1, 2).reshape(d, …)

with ``n`` = heads (q) or kv heads (k). A GGUF model is read back with the inverse, and a LoRA
adapter for it must have the same permutation on the rows of B (the output side).

A LoRA GGUF stores ``<base name>.lora_a`` (r, in) and ``.lora_b`` (out, r) — in GGUF's reversed
dim order ``ne = [in, r]`` and ``[r, out]`` — plus ``general.type = adapter``, ``adapter.type =
lora`` and one ``adapter.lora.alpha``: llama.cpp scales every module by ``alpha / r`` with ``r`` =
that module's B columns, and knows nothing of rsLoRA or per-module alpha. So each module's true
scale ``s`` is folded into B: ``B' = B · s · r / alpha`` gives ``alpha/r · B' @ A = s · B @ A``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, UnknownFormat, list_problems
from loratools.formats.patterns import most_common
from loratools.kinds import embedding

__all__ = [
    "ARCHITECTURES",
    "GgufArch",
    "adapter_tensors",
    "gguf_name",
    "hf_config",
    "hf_name",
    "permute_qk",
    "unpermute_qk",
]

ADAPTER_TYPE = "adapter"
KEY_TYPE = "general.type"
KEY_ARCH = "general.architecture"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_HF_TOKENIZER = "tokenizer.huggingface.json"

GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GLOBAL_BACK = {v: k for k, v in GLOBAL.items()}
BLOCK_BACK = {v: k for k, v in BLOCK.items()}
# GGUF tensors with no Hugging Face counterpart: llama.cpp computes them from the config
NOT_IN_HF = {"rope_freqs.weight"}
HF_BLOCK = re.compile(r"^(?:.*\.)?layers\.(?P<n>\d+)\.(?P<module>.+)$")
GGUF_BLOCK = re.compile(r"^blk\.(?P<n>\d+)\.(?P<module>[a-z_0-9]+)$")
# GGUF key (after "<arch>.") → config.json field
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class GgufArch:
    """How one Hugging Face ``model_type`` appears in llama.cpp.

    Attributes:
        gguf: the GGUF ``general.architecture``.
        hf_class: the transformers class written to config.json ``architectures``.
        permute_qk: whether llama.cpp permutes q/k rows for rotary embeddings.
    """

    gguf: str
    hf_class: str
    permute_qk: bool


ARCHITECTURES = {
    "llama": GgufArch("llama", "LlamaForCausalLM", True),
    "mistral": GgufArch("llama", "MistralForCausalLM", True),
    "qwen2": GgufArch("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": GgufArch("qwen3", "Qwen3ForCausalLM", False),
}
FROM_GGUF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF arch → HF model_type


def arch_for(model_type: str | None) -> GgufArch:
    """The GgufArch of a config.json ``model_type``.

    Raises:
        UnknownFormat: a model type not in :data:`ARCHITECTURES`.
    """
    if model_type not in ARCHITECTURES:
        raise UnknownFormat(
            f"model_type {model_type!r} is not supported for GGUF (supported: {', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[model_type]


def gguf_name(name: str) -> str | None:
    """A Hugging Face tensor or module name → its GGUF name, or None when llama.cpp has none.

    ``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``;
    ``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``.
    """
    stem, dot, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        stem, dot, suffix = name, "", ""
    tail = dot + suffix
    match = HF_BLOCK.match(stem)
    if match:
        leaf = BLOCK.get(match["module"])
        return f"blk.{match['n']}.{leaf}{tail}" if leaf else None
    leaf = GLOBAL.get(stem)
    return f"{leaf}{tail}" if leaf else None


def hf_name(name: str) -> str | None:
    """A GGUF tensor name → its Hugging Face name (``blk.3.attn_q.weight`` → ``model.layers.3…``)."""
    stem, _, suffix = name.rpartition(".")
    match = GGUF_BLOCK.match(stem)
    if match:
        module = BLOCK_BACK.get(match["module"])
        return f"model.layers.{match['n']}.{module}.{suffix}" if module else None
    module = GLOBAL_BACK.get(stem)
    return f"{module}.{suffix}" if module else None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation: halves-of-each-head → interleaved pairs. ``w``: (d, …)."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: interleaved pairs → halves of each head. ``w``: (d, …)."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(gguf_tensor: str, n_head: int, n_kv_head: int) -> int | None:
    """How many heads to (un)permute ``gguf_tensor`` by: q → heads, k → kv heads, else None."""
    if ".attn_q." in gguf_tensor:
        return n_head
    if ".attn_k." in gguf_tensor:
        return n_kv_head
    return None


# -- adapters ----------------------------------------------------------------------------------------
def gguf_alpha(adapter: Adapter) -> float:
    """The one ``adapter.lora.alpha`` to write: the most common plain (``alpha/r``) alpha, so
    that a uniform adapter keeps its factors bit for bit; rounded to float32 as the file stores it,
    so the folding below is relative to the value llama.cpp will read."""
    alpha = most_common((w.with_plain_scaling().alpha for w in adapter.lora_weights.values()), 1.0)
    return float(torch.tensor(alpha if alpha != 0 else 1.0, dtype=torch.float32))


def adapter_tensors(
    adapter: Adapter,
    base_tensor_of: Mapping[str, str],
    arch: GgufArch,
    n_head: int,
    n_kv_head: int,
    dtype: torch.dtype | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The llama.cpp LoRA tensors of ``adapter``, every module's true scale folded into B.

    For module m with scale ``s_m`` (any of alpha/r, alpha/√r, per-module alpha) and rank
    ``r_m``, llama.cpp computes ``alpha/r_m · B' @ A``; with ``B' = B · s_m · r_m / alpha`` that
    is ``s_m · B @ A``, the PEFT delta. q/k B rows get llama.cpp's permutation when ``arch``
    permutes.

    Args:
        adapter: the adapter (fan_in_fan_out is refused: llama.cpp has no Conv1D layers).
        base_tensor_of: module → base tensor name (``…q_proj.weight``), from resolve_modules.
        arch: the base model's architecture.
        n_head: attention heads; n_kv_head: key/value heads.
        dtype: output dtype (default: the adapter's).

    Returns:
        (alpha, {"blk.N.attn_q.weight.lora_a": A (r, in), "….lora_b": B' (out, r), …}).

    Raises:
        UnknownFormat: modules llama.cpp cannot map (listed by name), fan_in_fan_out, saved modules.
    """
    if adapter.fan_in_fan_out:
        raise UnknownFormat("a fan_in_fan_out (Conv1D) adapter cannot be a llama.cpp LoRA")
    if adapter.saved_modules:
        raise UnknownFormat(
            f"llama.cpp LoRA files cannot carry fully trained modules: {list_problems(sorted(adapter.saved_modules))}"
        )
    names = {m: gguf_name(base_tensor_of[m]) for m in adapter.weights}
    unmapped = sorted(m for m, n in names.items() if n is None)
    if unmapped:
        raise UnknownFormat(f"modules llama.cpp cannot map to a GGUF tensor: {list_problems(unmapped)}")
    alpha = gguf_alpha(adapter)
    out: dict[str, torch.Tensor] = {}
    for module, weight in adapter.lora_weights.items():
        name = str(names[module])
        plain = weight.with_plain_scaling()
        if getattr(weight, "embedding", False):  # token_embd: A and B flipped (kinds/embedding.py)
            target = dtype or weight.dtype
            lora_a, lora_b = embedding.gguf_factors(weight, plain.alpha / alpha)  # (vocab, r), (dim, r)
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = lora_a.to(target), lora_b.to(target)
            continue
        b = weight.b
        if plain.alpha != alpha:  # s·r/alpha_gguf = alpha_m/alpha_gguf; skipped when 1 to stay exact
            b = (b.float() * (plain.alpha / alpha)).to(weight.b.dtype)
        heads = qk_heads(name, n_head, n_kv_head) if arch.permute_qk else None
        if heads is not None:
            b = permute_qk(b, heads)
        target = dtype or weight.dtype
        out[f"{name}.lora_a"] = weight.a.to(target).contiguous()  # (r, in)
        out[f"{name}.lora_b"] = b.to(target).contiguous()  # (out, r)
    return alpha, out


# -- models ------------------------------------------------------------------------------------------
def hf_config(kv: Mapping[str, Any], has_output: bool) -> dict[str, Any]:
    """A Hugging Face config.json from a GGUF model's key/values.

    Args:
        kv: the GGUF metadata (``general.architecture``, ``llama.block_count``, …).
        has_output: whether the GGUF has an ``output.weight`` (else embeddings are tied).

    Raises:
        UnknownFormat: an architecture this mapping does not cover.
    """
    gguf_arch = kv.get(KEY_ARCH)
    if gguf_arch not in FROM_GGUF:
        raise UnknownFormat(
            f"GGUF architecture {gguf_arch!r} is not supported (supported: {', '.join(FROM_GGUF)})"
        )
    model_type = FROM_GGUF[gguf_arch]
    config: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type].hf_class], "model_type": model_type}
    for key, field in CONFIG_KEYS.items():
        if f"{gguf_arch}.{key}" in kv:
            config[field] = kv[f"{gguf_arch}.{key}"]
    if "head_dim" not in config and f"{gguf_arch}.rope.dimension_count" in kv:
        config["head_dim"] = kv[f"{gguf_arch}.rope.dimension_count"]  # equal for llama/mistral
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in kv:
        config["vocab_size"] = len(kv["tokenizer.ggml.tokens"])
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in kv:
            config[field] = int(kv[f"tokenizer.ggml.{key}"])
    config["tie_word_embeddings"] = not has_output
    config.setdefault("hidden_act", "silu")
    return config


def model_heads(config: Mapping[str, Any]) -> tuple[int, int]:
    """(heads, kv heads) from a config.json.

    Raises:
        LoratoolsError: the config lacks ``num_attention_heads``.
    """
    if "num_attention_heads" not in config:
        raise LoratoolsError(
            "the base config.json has no num_attention_heads; cannot place q/k rows for llama.cpp"
        )
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)
