"""The PEFT LoRA format: key names and adapter_config.json ↔ :class:`~loratools.adapter.Adapter`.

What PEFT writes and reads (``save_pretrained`` / ``PeftModel.from_pretrained``)::

    adapter_model.safetensors   metadata {"format": "pt"}
      base_model.model.<module>.lora_A.weight    (r, in)
      base_model.model.<module>.lora_B.weight    (out, r)
      base_model.model.<module>.weight           a whole module from ``modules_to_save``
    adapter_config.json
      peft_type "LORA", r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora, …

``rank_pattern``/``alpha_pattern`` keys are regexes PEFT matches as ``(.*\\.)?(key)$`` against
module names; we write full module names, which match exactly the module meant.
PEFT silently ignores unexpected keys, so nothing here relies on extra keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import UnknownFormat, list_problems
from loratools.formats import AdapterFiles, LoadContext, lycoris, validate
from loratools.formats.patterns import most_common
from loratools.formats.targets import matches_target
from loratools.kinds import embedding, fused

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_adapter", "to_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
UNSUPPORTED_KEYS = {
    "lora_B.bias": "LoRA with a trained bias (lora_bias)",
}
# Fields we model; everything else in a config is carried through verbatim.
MODELLED = {
    "peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
    "fan_in_fan_out", "base_model_name_or_path", "task_type", "modules_to_save",
}  # fmt: skip


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders ``layers.2`` before ``layers.10`` (files store names alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value PEFT would use for ``module``: the first pattern matching ``(.*\\.)?(key)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _refuse_unsupported(keys: list[str], config: Mapping[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise UnknownFormat(f"this is a PEFT {config.get('peft_type')} adapter; loratools handles LoRA only")
    for key in keys:
        for marker, variant in UNSUPPORTED_KEYS.items():
            if f".{marker}" in key:
                raise UnknownFormat(f"{variant} is not supported (tensor {key})")


def to_adapter(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    context: LoadContext | None = None,
) -> Adapter:
    """Build an Adapter from a PEFT state dict and its adapter_config.json contents (``context.config``).

    ``context.source`` (the path the user named) is how error messages name the adapter.
    ``context.base_shapes`` (the base's tensor name → shape) is needed only for
    ``target_parameters`` LoRA on fused expert tensors, which become one module per
    (parameter, expert) (:mod:`loratools.kinds.fused`).

    Raises:
        UnknownFormat: not LoRA, or a variant whose delta is not ``scale · B @ A`` (DoRA, …).
        MissingKeys-like UnknownFormat: a module with lora_A but no lora_B, or the reverse.
        InvalidAdapter: a config or tensors that PEFT would refuse or misapply (see
            :mod:`loratools.formats.validate`).
    """
    context = context or LoadContext()
    config, source, base_shapes = context.config, context.source, context.base_shapes
    keys = list(tensors)
    if str(config.get("peft_type", "LORA")).upper() in lycoris.PEFT_LYCORIS_TYPES:  # LoHa, LoKr
        return lycoris.peft_adapter(tensors, config, _provenance(metadata), source)
    _refuse_unsupported(keys, config)
    tensors, experts = _fused_experts(tensors, config, base_shapes, source)
    magnitudes = dora_magnitudes(tensors, config)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    embeddings: set[str] = set()
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        match = LORA_KEY.match(name) or embedding.PEFT_KEY.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["side"]] = tensor
            if ".lora_embedding_" in name:
                embeddings.add(match["module"])
        elif not DORA_KEY.match(name):
            saved[_saved_name(name)] = tensor
    unpaired = [f"{m} has only lora_{next(iter(f))}" for m, f in factors.items() if len(f) != 2]
    if unpaired:
        raise UnknownFormat(f"incomplete LoRA pairs: {list_problems(unpaired)}")
    default_alpha, alpha_pattern, rslora = _checked_config(config, factors, source)
    weights = {}
    for module, f in sorted(factors.items(), key=lambda item: natural_key(item[0])):
        alpha = float(pattern_value(alpha_pattern, module, default_alpha))
        if module in embeddings:
            weights[module] = embedding.from_peft(f["A"], f["B"], alpha, rslora)
        elif f["A"].ndim > 2:  # conv LoRA: A (r, in, kh, kw), B (out, r, 1, 1)
            weights[module] = lycoris.conv_lora(f["A"], f["B"], alpha, rslora)
        else:
            weights[module] = LoraWeight(f["A"], f["B"], alpha, rslora, magnitude=magnitudes.get(module))
    check_dora_pairs(magnitudes, factors, embeddings)
    weights.update(experts)
    validate.check_adapter(weights, source, {"a": "lora_A", "b": "lora_B"})
    provenance = _provenance(metadata)
    return Adapter(
        weights=weights,
        saved_modules=saved,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        extra_config={k: v for k, v in config.items() if k not in MODELLED},
        provenance=provenance,
    )


def _fused_experts(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    base_shapes: Mapping[str, tuple[int, ...]] | None,
    source: str,
) -> tuple[Mapping[str, torch.Tensor], dict[str, LoraWeight]]:
    """Split off ``target_parameters`` wrappers (fused (E, ·, ·) experts) as one LoRA per expert."""
    if not config.get("target_parameters"):
        return tensors, {}
    if base_shapes is None:  # the file says neither E, nor which parameter, nor the layout
        raise UnknownFormat(
            f"{source}: PEFT target_parameters LoRA (fused expert tensors: "
            f"{', '.join(map(str, config['target_parameters']))}) needs the base model to be read; "
            "give the base (merge BASE ADAPTER, spectrum ADAPTER --base BASE)"
        )
    alphas = config.get("alpha_pattern") or {}
    return fused.read_peft(
        tensors,
        config,
        base_shapes,
        lambda module: pattern_value(alphas, module, config.get("lora_alpha", 8)),
        bool(config.get("use_rslora", False)),
        source,
    )


def _checked_config(
    config: Mapping[str, Any], factors: Mapping[str, Mapping[str, torch.Tensor]], source: str
) -> tuple[float, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) once the config is known to fit the tensors.

    Values default as PEFT's LoraConfig does (r = 8, lora_alpha = 8). Checks that alphas are
    finite numbers, ranks positive integers, patterns valid regexes, that each module's factors
    pair up with the rank ``r``/``rank_pattern`` give it, and that ``target_modules`` selects
    every module (see :mod:`loratools.formats.validate`).
    """
    where = f"{source} ({CONFIG_NAME})"
    alpha = validate.config_alpha(config.get("lora_alpha", 8), "lora_alpha", where)
    rank = validate.config_rank(config.get("r", 8), "r", where)
    alphas = validate.config_patterns(
        config.get("alpha_pattern"), "alpha_pattern", where, validate.config_alpha
    )
    ranks = validate.config_patterns(config.get("rank_pattern"), "rank_pattern", where, validate.config_rank)
    rslora = validate.config_flag(config.get("use_rslora"), "use_rslora", where)
    validate.config_flag(config.get("fan_in_fan_out"), "fan_in_fan_out", where)
    for field in ("base_model_name_or_path", "task_type"):
        validate.config_text(config.get(field), field, where)
    for module, pair in factors.items():
        validate.check_pair(module, pair["A"], pair["B"], source, ("lora_A", "lora_B"))
    validate.check_ranks(
        {m: int(pair["A"].shape[0]) for m, pair in factors.items()},
        lambda module: int(pattern_value(ranks, module, rank)),
        "r/rank_pattern",
        where,
    )
    validate.check_targets(config, factors, where)
    return alpha, alphas, rslora


def _provenance(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """The ``loratools`` metadata entry (how the adapter was made), or ``{}`` if absent or unreadable."""
    try:
        value = json.loads((metadata or {}).get("loratools", "{}"))
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _saved_name(name: str) -> str:
    """A whole tensor's name in the base: PEFT saves the base layer of an adapted embedding/head
    (``save_embedding_layers``) as ``<module>.base_layer.weight`` and loads it over the base's
    ``<module>.weight``, so it is a replacement of that tensor."""
    stem, dot, suffix = name.rpartition(".")
    return stem.removesuffix(".base_layer") + dot + suffix if stem.endswith(".base_layer") else name


def _module_tensors(module: str, weight: LoraWeight) -> dict[str, torch.Tensor]:
    """The PEFT keys of one module's factors: ``lora_A.weight``/``lora_B.weight``, or for an
    embedding ``lora_embedding_A``/``lora_embedding_B`` in PEFT's transposed layout."""
    if getattr(weight, "embedding", False):
        a, b = embedding.to_peft(weight)
        return {f"{PREFIX}{module}.lora_embedding_A": a, f"{PREFIX}{module}.lora_embedding_B": b}
    a, b = lycoris.stored_factors(weight)  # conv LoRA: (r, in, kh, kw), (out, r, 1, 1)
    return {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}


def _saved_key(name: str, adapted: Mapping[str, Any]) -> str:
    """The PEFT key of a whole tensor: a module that also has LoRA factors keeps its replaced base
    weight under ``base_layer`` (the only place PEFT loads it from), others are modules_to_save."""
    module, dot, suffix = name.rpartition(".")
    return f"{PREFIX}{module}.base_layer{dot}{suffix}" if module in adapted else f"{PREFIX}{name}"


def _covers(target_modules: Any, modules: list[str]) -> bool:
    """Whether PEFT's ``target_modules`` (a regex or a list of names) selects every one of ``modules``."""
    if not isinstance(target_modules, (str, list)):
        return False
    return all(matches_target(m, target_modules) for m in modules)


def from_adapter(adapter: Adapter) -> AdapterFiles:
    """The PEFT state dict, safetensors metadata and adapter_config.json contents for ``adapter``.

    Per-module ranks and alphas become ``r``/``lora_alpha`` (the most common values) plus
    ``rank_pattern``/``alpha_pattern`` for the rest. rsLoRA is kept when every module uses it;
    otherwise rsLoRA modules are rewritten with ``alpha·√r`` so that ``alpha/r`` gives the same scale.
    """
    loras = adapter.lora_weights
    rslora = bool(loras) and all(w.use_rslora for w in loras.values())
    weights = {m: w if rslora else w.with_plain_scaling() for m, w in loras.items()}
    r = most_common([w.rank for w in weights.values()], 8)
    alpha = most_common([w.alpha for w in weights.values() if w.rank == r], float(r))
    rank_pattern = {m: w.rank for m, w in weights.items() if w.rank != r}
    alpha_pattern = {m: w.alpha for m, w in weights.items() if w.alpha != alpha}

    experts = {m: w for m, w in weights.items() if fused.FUSED_NAME.match(m)}  # target_parameters
    weights = {m: w for m, w in weights.items() if m not in experts}
    rank_pattern = {m: p for m, p in rank_pattern.items() if m in weights}
    alpha_pattern = {m: p for m, p in alpha_pattern.items() if m in weights}
    tensors: dict[str, torch.Tensor] = fused.peft_tensors(experts, r, alpha) if experts else {}
    if experts:  # a wrapped experts module with its own r/alpha: keyed by the module's path
        fused_ranks, fused_alphas = fused.peft_patterns(experts, r, alpha)
        rank_pattern.update(fused_ranks)
        alpha_pattern.update(fused_alphas)
    for module, w in weights.items():
        tensors.update(_module_tensors(module, w))
    for name, tensor in adapter.saved_modules.items():
        tensors[_saved_key(name, weights)] = tensor.contiguous()
    use_dora = dora_tensors(weights, tensors)

    modules = list(weights)
    extra = dict(adapter.extra_config)
    target = extra.pop("target_modules", None)
    if not _covers(target, modules):
        # Exact module names: leaf names would also wrap modules this adapter has no factors for.
        target = sorted(modules, key=natural_key)
    saved_modules = sorted(
        {m for m in (n.rsplit(".", 1)[0] for n in adapter.saved_modules) if m not in weights}
    )
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "target_modules": target,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {m: _plain_number(a) for m, a in alpha_pattern.items()},
        "use_rslora": rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update({k: v for k, v in extra.items() if k not in config or k in ("lora_dropout", "bias")})
    metadata = {"format": "pt"}
    if adapter.provenance:
        metadata["loratools"] = json.dumps(adapter.provenance, sort_keys=True)
    return AdapterFiles(tensors, metadata, config)


def _plain_number(value: float) -> float | int:
    """``16.0`` → ``16`` so configs read like the ones PEFT writes."""
    return int(value) if float(value).is_integer() else float(value)


# -- DoRA (use_dora): one magnitude vector per module ---------------------------------------------
def dora_magnitudes(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Module → DoRA magnitude m (out,) from ``<module>.lora_magnitude_vector`` keys.

    Raises:
        UnknownFormat: ``use_dora`` and the tensors disagree, or a magnitude is not a vector
            (PEFT's conv DoRA stores (1, out, 1, …): DoRA on conv modules is not supported).
    """
    found: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = DORA_KEY.match(key.removeprefix(PREFIX))
        if match is None:
            continue
        if tensor.ndim != 1:
            raise UnknownFormat(
                f"DoRA on conv modules is not supported ({key} has shape {list(tensor.shape)}); "
                "only DoRA on Linear modules is"
            )
        found[match["module"]] = tensor
    if bool(config.get("use_dora")) != bool(found):
        state = (
            "false but it has lora_magnitude_vector tensors"
            if found
            else "true but it has no lora_magnitude_vector"
        )
        raise UnknownFormat(f"adapter_config.json says use_dora {state}; fix the config to match the weights")
    return found


def check_dora_pairs(
    magnitudes: Mapping[str, torch.Tensor], factors: Mapping[str, Any], embeddings: set[str]
) -> None:
    """Every DoRA module has its LoRA pair, and in a DoRA adapter every LoRA module has a magnitude.

    Raises:
        UnknownFormat: an incomplete module, or DoRA on an embedding (not supported).
    """
    if not magnitudes:
        return
    if embeddings:
        raise UnknownFormat(
            f"DoRA on embedding modules is not supported ({sorted(embeddings)[0]}); only DoRA on Linear modules is"
        )
    lonely = [f"{m} has a magnitude but no lora_A/lora_B" for m in magnitudes if m not in factors]
    lonely += [f"{m} has lora_A/lora_B but no lora_magnitude_vector" for m in factors if m not in magnitudes]
    if lonely:
        raise UnknownFormat(f"incomplete DoRA modules: {list_problems(lonely)}")


def dora_tensors(weights: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """Add ``<module>.lora_magnitude_vector`` tensors for DoRA modules; True when there are any.

    Raises:
        UnknownFormat: DoRA and plain modules mixed (PEFT's use_dora holds for the whole adapter).
    """
    dora = {m: w.magnitude for m, w in weights.items() if getattr(w, "magnitude", None) is not None}
    if dora and len(dora) != len(weights):
        raise UnknownFormat(
            f"{len(dora)} DoRA and {len(weights) - len(dora)} plain LoRA modules in one adapter: PEFT's "
            "use_dora applies to every module; split the adapter or convert it to plain LoRA"
        )
    for module, magnitude in dora.items():
        tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = magnitude.contiguous()
    return bool(dora)
