"""What ``doctor``'s rules look at: plain facts about an adapter (and its base), no tensors.

The command layer gathers them once (from the file-kind detector, the loaded adapter, its
config and, with ``--base``, the base checkpoint); every rule is a pure function of them.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from loratools.adapter import Adapter

__all__ = ["AdapterFacts", "BaseFacts", "adapter_facts", "largest_abs_scale", "module_facts"]

DIFFUSION_MARKERS = (
    "lora_unet_",
    "lora_te",
    "unet.",
    "text_encoder",
    "transformer_blocks",
    "down_blocks",
    "up_blocks",
)


@dataclass(frozen=True)
class BaseFacts:
    """What the base model says about the adapter (``doctor --base``).

    Attributes:
        path: the base as the user gave it.
        missing: adapter modules with no matching base tensor.
        mismatched: ``module: adapter (d, k) vs base (d', k')`` lines.
        recorded: the base the adapter records (``base_model_name_or_path``), if any.
        tied_embeddings: the base ties lm_head to the input embedding.
        dtype: the base's dtype for the adapted tensors (the most common one).
        lost: module → share of its update lost when merged in the base's dtype.
        vocab_size: rows of the base's input embedding, when known.
        base_names: a sample of the base's tensor names, to recognise diffusion pipelines.
    """

    path: str
    missing: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    recorded: str | None = None
    tied_embeddings: bool = False
    dtype: str | None = None
    lost: Mapping[str, float] = field(default_factory=dict)
    vocab_size: int | None = None


@dataclass(frozen=True)
class AdapterFacts:
    """An adapter as the rules see it.

    Attributes:
        path: the adapter as the user gave it (fix commands use it).
        label: the detector's words for it ("a PEFT DoRA adapter").
        family: ``peft``, ``kohya``, ``cloneofsimo`` or ``gguf``.
        algorithm: LoRA, DoRA, LoHa, LoKr, LoCon, IA3, OFT, …
        load_error: why loratools could not load it (then the per-module facts are empty).
        kinds: module → kind (``lora``, ``dora``, ``loha``, ``lokr``).
        ranks: module → rank; shapes: module → (out, in); scales: module → effective scale.
        rslora: modules scaled by alpha/√r.
        conv: modules whose base weight is a convolution.
        embeddings: modules that adapt an embedding (PEFT ``lora_embedding_A/B``).
        fused_experts: expert slices of fused 3-D parameters (PEFT ``target_parameters``, ``…[e]``).
        saved_modules: tensors stored whole (PEFT ``modules_to_save``).
        zero_modules: modules whose update is exactly zero (an untrained B).
        duplicates: module names that occur twice once spelled the same way.
        diffusion: names of a diffusion pipeline (``lora_unet_…``, ``unet.…``), not of an LLM.
        base: facts from ``--base``.
    """

    path: str
    label: str
    family: str
    algorithm: str
    load_error: str | None = None
    kinds: Mapping[str, str] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    scales: Mapping[str, float] = field(default_factory=dict)
    rslora: tuple[str, ...] = ()
    conv: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    fused_experts: tuple[str, ...] = ()
    saved_modules: tuple[str, ...] = ()
    zero_modules: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()
    diffusion: bool = False
    base: BaseFacts | None = None

    @property
    def modules(self) -> list[str]:
        return list(self.kinds)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def of_kind(self, *kinds: str) -> tuple[str, ...]:
        return tuple(m for m, k in self.kinds.items() if k in kinds)

    @property
    def mixed_scales(self) -> bool:
        """Modules do not share one alpha: a single global alpha cannot express them."""
        alphas = {round(s * r, 6) for m, (s, r) in _scale_rank(self).items() if m not in self.rslora}
        return len(alphas) > 1

    def command(self, *words: str) -> str:
        """A loratools command line with this adapter's path (and --base, when a word is BASE)."""
        base = self.base.path if self.base is not None else "BASE"
        parts = [
            shlex.quote(self.path) if w == "ADAPTER" else shlex.quote(base) if w == "BASE" else w
            for w in words
        ]
        return "loratools " + " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "algorithm": self.algorithm,
            "modules": len(self.kinds),
            "kinds": sorted(set(self.kinds.values())),
            "max_rank": self.max_rank,
            "rslora_modules": len(self.rslora),
            "saved_modules": list(self.saved_modules),
            "embedding_modules": list(self.embeddings),
            "conv_modules": len(self.conv),
            "load_error": self.load_error,
        }


def _scale_rank(facts: AdapterFacts) -> dict[str, tuple[float, int]]:
    return {
        m: (facts.scales[m], facts.ranks[m]) for m in facts.kinds if m in facts.scales and m in facts.ranks
    }


def largest_abs_scale(facts: AdapterFacts) -> tuple[str, float] | None:
    """The module with the largest |scale|, and that scale."""
    if not facts.scales:
        return None
    name = max(facts.scales, key=lambda m: abs(facts.scales[m]))
    return name, facts.scales[name]


def _is_zero(weight: Any) -> bool:
    """ΔW = 0: one of the factored form's sides is all zeros (LoRA's B right after init)."""
    left, right = weight.scaled_factors()
    return bool(torch.count_nonzero(left) == 0 or torch.count_nonzero(right) == 0)


def module_facts(adapter: Adapter) -> dict[str, Any]:
    """The per-module facts of a loaded adapter (kinds, ranks, shapes, scales, …)."""
    kinds, ranks, shapes, scales = {}, {}, {}, {}
    rslora, conv, embeddings, fused, zeros = [], [], [], [], []
    for name, weight in adapter.weights.items():
        kinds[name] = str(getattr(weight, "kind", "lora"))
        ranks[name] = int(weight.rank)
        shapes[name] = tuple(int(d) for d in weight.shape)
        scale = float(getattr(weight, "scale", math.nan))
        scales[name] = scale
        if getattr(weight, "use_rslora", False):
            rslora.append(name)
        weight_shape = getattr(weight, "weight_shape", None)
        if weight_shape is not None and len(weight_shape) > 2:
            conv.append(name)
        if getattr(weight, "embedding", False):
            embeddings.append(name)
        if getattr(weight, "param", None) is not None:  # kinds.fused.ExpertLora
            fused.append(name)
        if _is_zero(weight):
            zeros.append(name)
    spelled = [name.replace("_", ".").lower() for name in adapter.weights]
    duplicates = sorted({n for n in adapter.weights if spelled.count(n.replace("_", ".").lower()) > 1})
    return {
        "kinds": kinds,
        "ranks": ranks,
        "shapes": shapes,
        "scales": scales,
        "rslora": tuple(rslora),
        "conv": tuple(conv),
        "embeddings": tuple(embeddings),
        "fused_experts": tuple(fused),
        "saved_modules": tuple(sorted(adapter.saved_modules)),
        "zero_modules": tuple(zeros),
        "duplicates": tuple(duplicates),
    }


def adapter_facts(
    path: str,
    label: str,
    family: str,
    algorithm: str,
    adapter: Adapter | None,
    *,
    load_error: str | None = None,
    base: BaseFacts | None = None,
    names: list[str] | None = None,
) -> AdapterFacts:
    """Facts from what the command layer found; ``names`` are raw tensor names when the adapter
    could not be loaded (to recognise a diffusion adapter anyway)."""
    per_module = module_facts(adapter) if adapter is not None else {}
    seen = list(per_module.get("kinds", {})) + list(names or [])
    diffusion = any(marker in name for name in seen for marker in DIFFUSION_MARKERS)
    return AdapterFacts(
        path=path,
        label=label,
        family=family,
        algorithm=algorithm,
        load_error=load_error,
        diffusion=diffusion,
        base=base,
        **per_module,
    )
