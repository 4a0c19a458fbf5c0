"""A pure-torch Llama-family causal language model, built from a Hugging Face config.json.

Covers Llama 1–3, Mistral-style and Qwen2 checkpoints: RMSNorm, rotary position embeddings
(RoPE) with the config's theta and ``linear`` / ``llama3`` scaling, grouped-query attention via
``F.scaled_dot_product_attention``, the SwiGLU MLP, optional attention biases (Qwen2: q, k, v)
and tied embeddings. Module names equal the checkpoint's tensor names (``model.layers.0.self_attn
.q_proj`` ↔ ``model.layers.0.self_attn.q_proj.weight``), so weights load by name, tensor by
tensor, and LoRA adapters trained on it load onto transformers' model with PEFT unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loratools.errors import CheckpointError, MissingKeys, ShapeMismatch, UnknownFormat, list_problems
from loratools.train.loss import head_loss

__all__ = ["LlamaConfig", "LlamaForCausalLM", "load_model", "rope_frequencies"]

SUPPORTED = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face config.json that shape the network."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    attention_bias: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k, v only
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        """Read a config.json dict; accepts both ``rope_scaling`` and transformers 5's ``rope_parameters``.

        Raises:
            UnknownFormat: a model type or RoPE scaling this model does not implement.
        """
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise UnknownFormat(
                f"config.json: model_type {model_type!r} is not supported by the built-in model "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        heads = int(config["num_attention_heads"])
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UnknownFormat(
                f"config.json: rope scaling {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})"
            )
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        values.update(
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            rope_theta=theta,
            rope_scaling={**rope, "rope_type": rope_type},
            qkv_bias=model_type == "qwen2",
            attention_bias=bool(config.get("attention_bias", False)) and model_type != "qwen2",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=_first(config.get("bos_token_id")),
            eos_token_id=_first(config.get("eos_token_id")),
        )
        return cls(**values)


def _first(value: Any) -> int | None:
    """Llama 3 configs list several eos ids; the first is the end-of-document token."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies θ^(-2i/d) for i < d/2, float32 (d/2,), with the config's scaling.

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides only the low ones
    (wavelength above ``original_max_position_embeddings / low_freq_factor``) and blends
    smoothly between the two regimes, as Meta's Llama 3.1 reference does.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        return inv_freq
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (−x2, x1) on the last dimension (Hugging Face's RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """``w · x / sqrt(mean(x²) + eps)``, computed in float32 and cast back to the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; ``n_kv`` key/value heads serve ``n_heads`` query heads."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_heads:  # share each kv head across n_heads / n_kv query heads
            rep = self.n_heads // self.n_kv
            k = k[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_heads, T, -1)
            v = v[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_heads, T, -1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm; returns hidden states (B, T, hidden)."""

    inv_freq: torch.Tensor  # RoPE inverse frequencies (head_dim / 2,), a non-persistent buffer

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gradient_checkpointing = False
        self.register_buffer("inv_freq", rope_frequencies(c), persistent=False)

    def rope(self, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables (T, hd) for positions 0…T−1, computed in float32 then cast."""
        positions = torch.arange(T, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        cos, sin = self.rope(input_ids.shape[1], dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus the language-model head: ``input_ids (B, T) → logits (B, T, vocab)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head when the config ties them (moving devices unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); or, given labels (B, T), the summed next-token loss (a scalar).

        The loss form never materialises all logits at once (see :mod:`loratools.train.loss`).
        """
        hidden = self.model(input_ids)  # (B, T, hidden)
        if labels is None:
            return self.lm_head(hidden)
        return head_loss(hidden, self.lm_head, labels)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward: memory O(layers) → O(1) for ~30% more compute."""
        self.model.gradient_checkpointing = enabled


def read_config(model_dir: Path) -> LlamaConfig:
    """The :class:`LlamaConfig` of a model folder's config.json.

    Raises:
        CheckpointError: no readable config.json.
    """
    from loratools.io.model_config import require_model_config

    config = require_model_config(model_dir)
    try:
        return LlamaConfig.from_dict(config)
    except (ValueError, KeyError) as exc:
        path = model_dir / "config.json"
        raise CheckpointError(f"{path}: not a readable Llama-family config.json ({exc!r})") from exc


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """Build the model from ``path``/config.json and load its weights one tensor at a time.

    The model is created on the meta device (no memory), materialised on ``device`` in
    ``dtype``, and each checkpoint tensor is copied in as it is read, so peak memory is the model
    plus one tensor.

    Args:
        path: a local model folder (single or sharded safetensors, or .bin).
        dtype: parameter dtype (float32, or bfloat16 to halve memory).
        device: where the parameters live.

    Raises:
        MissingKeys: model tensors missing from the checkpoint, or checkpoint tensors the model lacks.
        ShapeMismatch: a tensor whose shape differs from the config's.
    """
    from loratools.io.checkpoint import open_checkpoint

    folder = Path(path)
    ckpt = open_checkpoint(folder)
    config = read_config(ckpt.model_dir or folder.parent)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    model.model.inv_freq = rope_frequencies(config).to(device)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    wanted = set(params)
    unexpected, problems = [], []
    for name, tensor in ckpt.iter_tensors():
        if name not in params:
            if not (
                name.endswith("rotary_emb.inv_freq")
                or (config.tie_word_embeddings and name == "lm_head.weight")
            ):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            problems.append(f"{name} {tuple(tensor.shape)} vs {tuple(params[name].shape)}")
            continue
        with torch.no_grad():
            params[name].copy_(tensor)
        wanted.discard(name)
    if problems:
        raise ShapeMismatch(f"{folder}: tensors that do not fit config.json: {list_problems(problems)}")
    if wanted or unexpected:
        detail = [f"missing {n}" for n in sorted(wanted)] + [f"unexpected {n}" for n in unexpected]
        raise MissingKeys(
            f"{folder}: checkpoint does not match a {config.model_type} model: {list_problems(detail)}"
        )
    return model
