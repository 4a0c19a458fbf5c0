"""The in-memory model of a LoRA adapter. The scaling conventions are written here, and only here.

A LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) replaces a weight update ΔW (out×in)
by a low-rank product::

    ΔW ≈ scale · B @ A,   A: (r, in),  B: (out, r)
    scale = alpha / r             (the paper, PEFT's default)
    scale = alpha / sqrt(r)       (rsLoRA, PEFT's ``use_rslora=True``)

so a layer computes ``h = W0 @ x + scale · B @ (A @ x)``. Both factors keep the dtype they were
stored in; every computation upcasts to float32 first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Adapter", "LoraWeight", "ModuleWeight", "base_weight_shape", "lora_scale"]


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor a LoRA product is multiplied by: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@runtime_checkable
class ModuleWeight(Protocol):
    """What every adapter kind (LoRA, DoRA, LoHa, LoKr, …) offers for one module.

    Every kind's update is a 2-D matrix ``ΔW`` of :attr:`shape` (out, in·kh·kw) with an exact
    factored form ``ΔW = L @ R`` of width :attr:`rank`; ops that need only ΔW (merge of additive
    kinds, spectrum, resize, combine, convert) work on ``scaled_factors()`` and never ask which
    kind it is. A conv weight (out, in, kh, kw) is the 2-D delta reshaped: ``ΔW.reshape(weight_shape)``.

    Attributes:
        kind: ``"lora"``, ``"dora"``, ``"loha"``, ``"lokr"``, … (a registry key of ``loratools.kinds``).
        shape: the 2-D delta's shape (out, in·kh·kw).
        weight_shape: the base weight's full shape when it is not 2-D (conv: (out, in, kh, kw)),
            else None (see :func:`base_weight_shape`).
        rank: the width of the exact factored form ``scaled_factors()``.
        alpha: the module's alpha as stored (what the file says).
        scale: the multiplier the kind's rule derives from alpha (LoRA alpha/r, LoKr per its file).
        dtype: the dtype the factors are stored in.
        num_parameters: stored parameters (what the file holds for this module).
    """

    @property
    def kind(self) -> str: ...

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def weight_shape(self) -> tuple[int, ...] | None: ...

    @property
    def rank(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def num_parameters(self) -> int: ...

    @property
    def alpha(self) -> float: ...

    @property
    def scale(self) -> float: ...

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``(L, R)``, shapes (out, rank) and (rank, in·kh·kw), with ``L @ R = ΔW``."""
        ...

    def delta(self) -> torch.Tensor:
        """The dense 2-D update ΔW in float32, shape :attr:`shape`. Prefer factored forms."""
        ...

    def to(self, dtype: torch.dtype) -> ModuleWeight:
        """The same module with its stored tensors cast to ``dtype``."""
        ...


def base_weight_shape(weight: ModuleWeight) -> tuple[int, ...]:
    """The shape of the base tensor a module adapts: its ``weight_shape``, else its 2-D ``shape``."""
    return weight.weight_shape if weight.weight_shape is not None else weight.shape


def check_weight_shape(weight_shape: tuple[int, ...] | None, shape: tuple[int, int]) -> None:
    """Raise ValueError unless ``weight_shape`` (if given) flattens to the 2-D delta ``shape``."""
    if weight_shape is None:
        return
    if weight_shape[0] != shape[0] or math.prod(weight_shape[1:]) != shape[1]:
        raise ValueError(
            f"weight shape {tuple(weight_shape)} does not flatten to the delta's (out, in) {shape}"
        )


@dataclass(frozen=True)
class LoraWeight:
    """One module's LoRA factors.

    A conv LoRA (kohya LoCon, PEFT's Conv2d LoRA) is the same product on the flattened kernel:
    ``lora_down`` (r, in, kh, kw) is stored here as A (r, in·kh·kw), ``lora_up`` (out, r, 1, 1)
    as B (out, r), and ``weight_shape`` = (out, in, kh, kw) says how ΔW reshapes onto the base.

    Attributes:
        a: ``lora_A``, shape (r, in_features) (in_features = in·kh·kw for conv).
        b: ``lora_B``, shape (out_features, r).
        alpha: the LoRA alpha of this module.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        weight_shape: the base weight's shape when it is not (out, in), e.g. conv (out, in, kh, kw).
        embedding: the module is an embedding (num_embeddings, dim) looked up by token id. The
            factors are still in the base weight's layout (B (num_embeddings, r), A (r, dim)),
            so every op treats it like any module; only file formats differ: PEFT stores
            ``lora_embedding_A`` = Bᵀ (r, num_embeddings) and ``lora_embedding_B`` = Aᵀ (dim, r)
            (its delta ``s·(B_peft @ A_peft)ᵀ``), see :mod:`loratools.kinds.embedding`.
        magnitude: DoRA's magnitude vector m, shape (out_features,), or None for plain LoRA. With
            it the module is DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353):
            ``W' = m / ‖W0 + s·B@A‖_row · (W0 + s·B@A)``, which depends on W0, so
            ``scaled_factors()``/``delta()`` give only the direction update ``s·B@A``;
            ``loratools.ops.dora`` computes the effective update from the base.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    use_rslora: bool = False
    weight_shape: tuple[int, ...] | None = None
    embedding: bool = False
    magnitude: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"LoRA factors must be A (r, in) and B (out, r); got A {tuple(self.a.shape)}, "
                f"B {tuple(self.b.shape)}"
            )
        check_weight_shape(self.weight_shape, self.shape)
        if self.magnitude is not None and tuple(self.magnitude.shape) != (self.out_features,):
            raise ValueError(
                f"DoRA magnitude must have shape ({self.out_features},); got {tuple(self.magnitude.shape)}"
            )

    @property
    def kind(self) -> str:
        return "lora" if self.magnitude is None else "dora"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the delta this module adds: (out_features, in_features)."""
        return (self.out_features, self.in_features)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def num_parameters(self) -> int:
        magnitude = 0 if self.magnitude is None else self.magnitude.numel()
        return self.a.numel() + self.b.numel() + magnitude

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale · B, A)`` in float32, so that ``delta = B' @ A``. Shapes (out, r), (r, in)."""
        return self.b.float() * self.scale, self.a.float()

    def delta(self) -> torch.Tensor:
        """The dense update ``scale · B @ A`` in float32, shape (out, in). Prefer factored forms."""
        b, a = self.scaled_factors()
        return b @ a

    def with_plain_scaling(self) -> LoraWeight:
        """The same delta expressed with ``scale = alpha / r`` (rsLoRA alpha folded: alpha·√r)."""
        if not self.use_rslora:
            return self
        return replace(self, alpha=self.alpha * math.sqrt(self.rank), use_rslora=False)

    def to(self, dtype: torch.dtype) -> LoraWeight:
        """The same module with both factors (and a DoRA magnitude) cast to ``dtype``."""
        magnitude = None if self.magnitude is None else self.magnitude.to(dtype)
        return replace(self, a=self.a.to(dtype), b=self.b.to(dtype), magnitude=magnitude)


@dataclass(frozen=True)
class Adapter:
    """A whole adapter: LoRA factors per module, plus what PEFT needs to place them.

    Module names are paths inside the model PEFT wraps, without PEFT's ``base_model.model.``
    prefix: the module ``model.layers.0.self_attn.q_proj`` adapts the base tensor
    ``model.layers.0.self_attn.q_proj.weight``.

    Attributes:
        weights: module path → its LoRA factors.
        saved_modules: tensor name (module path + ``.weight``/``.bias``) → a full replacement
            tensor (PEFT's ``modules_to_save``: embeddings, heads, norms trained in full).
        base_model: the base model the adapter was made for (``base_model_name_or_path``).
        task_type: PEFT task type, e.g. ``CAUSAL_LM``.
        fan_in_fan_out: the base stores weights as (in, out) (GPT-2's Conv1D); deltas are
            transposed when applied to it.
        extra_config: other adapter_config.json fields, kept verbatim for faithful round trips.
        provenance: how the adapter was made (command, inputs, ranks, energy kept).
    """

    weights: Mapping[str, ModuleWeight]
    saved_modules: Mapping[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.weights)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: w.rank for name, w in self.weights.items()}

    @property
    def num_parameters(self) -> int:
        lora = sum(w.num_parameters for w in self.weights.values())
        return lora + sum(t.numel() for t in self.saved_modules.values())

    @property
    def target_modules(self) -> list[str]:
        """Leaf names of the adapted modules (``q_proj``, ``v_proj``, …), sorted; a fused expert
        parameter's slices (``….experts.gate_up_proj[3]``) count once, as ``gate_up_proj``."""
        return sorted({name.rsplit(".", 1)[-1].split("[", 1)[0] for name in self.weights})

    def delta(self, name: str) -> torch.Tensor:
        """Module ``name``'s dense update in the base weight's layout, float32."""
        weight = self.weights[name]
        delta = weight.delta()
        # fan_in_fan_out is about Conv1D weights; an embedding is (num_embeddings, dim) either way
        return delta.T if self.fan_in_fan_out and not getattr(weight, "embedding", False) else delta

    @property
    def lora_weights(self) -> dict[str, LoraWeight]:
        """The modules as plain LoRA factors, for code that needs A and B themselves (file writers,
        training). Raises UnknownFormat naming the first module of another kind (LoHa, LoKr)."""
        loras = {name: w for name, w in self.weights.items() if isinstance(w, LoraWeight)}
        other = next((name for name in self.weights if name not in loras), None)
        if other is not None:
            from loratools.errors import UnknownFormat
            from loratools.kinds import kind_label

            raise UnknownFormat(
                f"module {other} is a {kind_label(self.weights[other].kind)} module, which this needs as "
                "plain LoRA factors; convert it to its optimal plain LoRA first "
                "(loratools convert ADAPTER --to peft|kohya -o OUT -r RANK | --energy F | --budget N)"
            )
        return loras

    def with_weights(self, weights: Mapping[str, ModuleWeight], **provenance: Any) -> Adapter:
        """A copy with new factors; ``provenance`` entries are added to the record."""
        return replace(self, weights=dict(weights), provenance={**self.provenance, **provenance})
