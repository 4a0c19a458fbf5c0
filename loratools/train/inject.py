"""Putting LoRA layers into a model, and getting them out again as an :class:`Adapter`.

Target selection follows PEFT's ``target_modules``: a list selects every ``nn.Linear`` whose
full name equals an entry or ends with ``"." + entry`` (``q_proj`` selects
``model.layers.0.self_attn.q_proj``); a single string is a regex that must match the full name.
Module names in the built-in model are the Hugging Face checkpoint's, so an exported adapter
pairs with ``model.layers.0.self_attn.q_proj.weight`` and loads with PEFT unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, MissingKeys, ShapeMismatch, list_problems
from loratools.formats.names import suffix_matches
from loratools.formats.targets import matches_target
from loratools.train.layers import LoRALinear

__all__ = [
    "inject_lora",
    "load_lora_adapter",
    "lora_layers",
    "lora_parameters",
    "matches_target",
    "to_adapter",
]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    rank_pattern: Mapping[str, int] | None = None,
) -> list[str]:
    """Freeze ``model`` and wrap each targeted ``nn.Linear`` in a :class:`LoRALinear`, in place.

    Args:
        model: any module; every parameter is frozen, then only LoRA factors train.
        targets: leaf names / suffixes (list) or a full-match regex (str), as PEFT.
        rank: r for every target unless ``rank_pattern`` names the module.
        alpha: LoRA alpha (scale ``alpha / r``).
        dropout: LoRA dropout probability.
        use_rslora: scale ``alpha / sqrt(r)``.
        init: ``"kaiming"`` or ``"gaussian"`` for A.
        rank_pattern: full module name → rank, overriding ``rank``.

    Returns:
        The wrapped module names, in model order.

    Raises:
        MissingKeys: no ``nn.Linear`` matches ``targets``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches_target(name, targets)
    ]
    if not chosen:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise MissingKeys(
            f"--targets {targets!r} matches no linear layer; the model's linear layers are: {', '.join(linears)}"
        )
    for name in chosen:
        r = (rank_pattern or {}).get(name, rank)
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        _set_submodule(model, name, LoRALinear(base, r, alpha, dropout, use_rslora, init))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in ``model`` by its module name (the name of the wrapped linear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (A then B of each layer, in model order)."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def to_adapter(
    model: nn.Module,
    *,
    base_model: str | None = None,
    targets: str | Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Adapter:
    """The model's LoRA factors as an :class:`Adapter` (float32 CPU copies), ready for save_adapter.

    Args:
        model: a model with LoRALinear layers (unwrap DDP first).
        base_model: recorded as ``base_model_name_or_path``.
        targets: recorded as PEFT's ``target_modules`` (else the adapted leaf names).
        provenance: how the adapter was trained; stored in the safetensors metadata.
    """
    weights = {name: layer.to_lora_weight() for name, layer in lora_layers(model).items()}
    extra: dict[str, Any] = {}
    if targets is not None:
        extra["target_modules"] = targets if isinstance(targets, str) else list(targets)
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    extra["lora_dropout"] = dropouts[0] if dropouts else 0.0
    return Adapter(
        weights=weights,
        base_model=base_model,
        task_type="CAUSAL_LM",
        extra_config=extra,
        provenance=dict(provenance or {}),
    )


def load_lora_adapter(
    model: nn.Module, adapter: Adapter, *, dropout: float = 0.0, init: str = "kaiming"
) -> list[str]:
    """Inject LoRA layers exactly where ``adapter`` has factors and copy them in (to continue training).

    Adapter module names are resolved against the model's linear layers by exact name, then by a
    unique ``.``-suffix match (so ``layers.0.self_attn.q_proj`` finds ``model.layers.0…``).

    Returns:
        The model's module names that received factors.

    Raises:
        MissingKeys: adapter modules that match no linear layer (all listed at once).
        ShapeMismatch: factors whose shape does not fit the layer.
    """
    dora = [n for n, w in adapter.weights.items() if getattr(w, "magnitude", None) is not None]
    if dora:  # LoRALinear has no magnitude: training on would silently drop it
        raise LoratoolsError(
            f"{len(dora)} DoRA module(s) ({list_problems(dora, 3)}); loratools train has no DoRA layer: "
            "bake it into a plain LoRA first (loratools convert ADAPTER --to peft -o DIR -r R --base BASE)"
        )
    linears = dict.fromkeys(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for name in adapter.weights:
        found = suffix_matches(name, linears)
        if len(found) == 1:
            mapping[name] = found[0]
        else:
            problems.append(f"{name} ({'no' if not found else len(found)} matching layers)")
    if problems:
        raise MissingKeys(f"adapter modules that do not fit the model: {list_problems(problems)}")
    pattern = {mapping[n]: w.rank for n, w in adapter.weights.items()}
    first = next(iter(adapter.lora_weights.values()))
    inject_lora(
        model, list(pattern), first.rank, first.alpha, dropout=dropout, init=init, rank_pattern=pattern
    )
    layers = lora_layers(model)
    for name, weight in adapter.lora_weights.items():
        target = layers[mapping[name]]
        if weight.shape != (target.out_features, target.in_features):
            raise ShapeMismatch(
                f"adapter module {name}: delta {weight.shape} does not fit layer {mapping[name]} "
                f"{(target.out_features, target.in_features)}; is this the adapter's base model?"
            )
        target.load_lora_weight(weight)
    return list(pattern)
