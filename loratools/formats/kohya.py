"""The kohya (sd-scripts) LoRA format: key names and ``ss_*`` metadata ↔ :class:`~loratools.adapter.Adapter`.

What sd-scripts' ``networks.lora`` writes, and ComfyUI, A1111, diffusers and Forge read::

    <prefix>_<module path with . → _>.lora_down.weight   A, (r, in)
    <prefix>_<module path with . → _>.lora_up.weight     B, (out, r)
    <prefix>_<module path with . → _>.alpha              alpha, a 0-d tensor
    metadata  ss_network_module "networks.lora", ss_network_dim, ss_network_alpha, …

The scale is always ``alpha / r`` per module (``alpha = r`` when the tensor is absent), so rsLoRA
(``alpha / sqrt(r)``) and PEFT's rank/alpha patterns are folded into each module's alpha:
``alpha_kohya = alpha · sqrt(r)`` for rsLoRA. The prefix names the network part: ``lora_unet``,
``lora_te``/``lora_te1``/``lora_te2`` (text encoders), ``lora_transformer``, …

Turning ``lora_unet_model_layers_0_self_attn_q_proj`` back into a dotted path is ambiguous
(``self_attn`` holds an underscore), so names are resolved against the base checkpoint's tensor
names. Files written by loratools also carry the dotted names, per-module alpha/rsLoRA and the
PEFT config fields in the ``loratools_adapter`` metadata entry, so PEFT → kohya → PEFT is exact
without a base; that entry is used only while it still agrees with the tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight, lora_scale
from loratools.errors import LoratoolsError, MissingKeys, UnknownFormat, list_problems, name_summary
from loratools.formats import AdapterFiles, LoadContext, lycoris, validate
from loratools.formats.detect import KOHYA_PREFIX
from loratools.formats.names import suffix_matches
from loratools.formats.patterns import most_common

__all__ = ["ADAPTER_METADATA", "DEFAULT_PREFIX", "PREFIX", "from_adapter", "kohya_stem", "to_adapter"]

DEFAULT_PREFIX = KOHYA_PREFIX
PREFIX = re.compile(r"^lora_[A-Za-z0-9]+$")  # one underscore: where the prefix ends is unambiguous
KEY = re.compile(
    r"^(?P<stem>lora_[A-Za-z0-9]+_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"
)
ADAPTER_METADATA = "loratools_adapter"
# tensor-name parts of the variants that are not a plain LoRA (their delta is not s·B·A)
VARIANTS = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa",
    "hada_t1": "LoHa", "hada_t2": "LoHa",
    "lokr_w1": "LoKr", "lokr_w2": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr",
    "lokr_w2_a": "LoKr", "lokr_w2_b": "LoKr", "lokr_t2": "LoKr",
    "lora_mid": "LoCon with a mid (Tucker) factor", "oft_blocks": "OFT",
    "diff": "a full weight difference (diff)", "diff_b": "a bias difference (diff_b)",
    "on_input": "IA³", "w_norm": "a norm difference (w_norm)", "b_norm": "a norm difference (b_norm)",
}  # fmt: skip


def kohya_stem(module: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``model.layers.0.self_attn.q_proj`` → ``lora_unet_model_layers_0_self_attn_q_proj``.

    A module named by its kohya stem (read from a kohya file without a base: no dots, a
    ``lora_<part>_`` prefix) is its own stem, so such an adapter is written back unchanged.
    """
    if "." not in module and KEY.match(f"{module}.alpha"):
        return module
    return f"{prefix}_{module.replace('.', '_')}"


def _split_stem(stem: str) -> tuple[str, str]:
    """``lora_te1_text_model_…`` → (``lora_te1``, ``text_model_…``)."""
    first, second, rest = stem.split("_", 2)
    return f"{first}_{second}", rest


# -- kohya → Adapter -------------------------------------------------------------------------------
def _group(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by kohya stem: ``{stem: {"lora_down.weight"|"lora_up.weight"|"alpha": tensor}}``.

    Raises:
        UnknownFormat: a tensor of a non-LoRA variant (naming it), an unexpected tensor, an
            incomplete down/up pair, or a convolution LoRA.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            part = key.split(".", 1)[1] if "." in key else ""
            variant = VARIANTS.get(part.removesuffix(".weight"))
            if variant:
                raise UnknownFormat(
                    f"{key}: a {variant} tensor; only plain LoRA (lora_down/lora_up) converts"
                )
            unexpected.append(key)
            continue
        groups.setdefault(match["stem"], {})[match["part"]] = tensor
    if unexpected:
        raise UnknownFormat(f"not kohya LoRA tensors: {list_problems(unexpected)}")
    problems = [
        f"{stem} lacks {side}"
        for stem, parts in groups.items()
        for side in ("lora_down.weight", "lora_up.weight")
        if side not in parts
    ]
    if problems:
        raise UnknownFormat(f"incomplete kohya LoRA pairs: {list_problems(problems)}")
    convs = [
        f"{s} {tuple(p['lora_down.weight'].shape)}"
        for s, p in groups.items()
        if p["lora_down.weight"].ndim != 2
    ]
    if convs:
        raise UnknownFormat(
            f"convolution LoRA (LoCon, conv 1×1/3×3) is not supported, only Linear layers: {list_problems(convs)}"
        )
    return groups


def _stored(metadata: Mapping[str, str], stems: Iterable[str]) -> dict[str, Any] | None:
    """The ``loratools_adapter`` record, if present and naming exactly these stems.

    Its ``modules`` is a list of ``[module, alpha, use_rslora]`` in the adapter's order.
    """
    try:
        record = json.loads(metadata.get(ADAPTER_METADATA, "null"))
        prefix = record["prefix"]
        modules = {str(m): [float(alpha), bool(rslora)] for m, alpha, rslora in record["modules"]}
    except (ValueError, TypeError, KeyError):
        return None
    if {kohya_stem(m, prefix) for m in modules} != set(stems):
        return None  # the file was edited since loratools wrote it: trust the tensors
    texts_ok = all(isinstance(record.get(f), (str, type(None))) for f in ("base_model", "task_type"))
    if not texts_ok or not isinstance(record.get("extra_config") or {}, dict):
        return None  # a damaged record: trust the tensors
    return {**record, "modules": modules}


def resolve_stems(stems: Iterable[str], base_names: Iterable[str], where: str = "adapter") -> dict[str, str]:
    """Map kohya stems to dotted module paths using the base's tensor names.

    A base tensor ``a.b_c.weight`` is the module ``a.b_c``, flattened ``a_b_c``. A stem
    ``<prefix>_<flat>`` matches a module whose flattened name equals ``<flat>``, else one whose
    flattened name ends with ``_<flat>`` (or the reverse), when exactly one does.

    Raises:
        MissingKeys: every stem that matches no module or several, listed at once.
    """
    modules = [n.removesuffix(".weight") for n in base_names if n.endswith(".weight")]
    by_flat: dict[str, list[str]] = {}
    for module in modules:
        by_flat.setdefault(module.replace(".", "_"), []).append(module)
    resolved: dict[str, str] = {}
    problems: list[str] = []
    for stem in stems:
        flat = _split_stem(stem)[1]
        matches = [m for f in suffix_matches(flat, by_flat, sep="_") for m in by_flat[f]]
        if len(matches) == 1:
            resolved[stem] = matches[0]
        else:
            found = f"{len(matches)} base modules ({', '.join(matches[:3])})" if matches else "no base module"
            problems.append(f"{stem} matches {found}")
    if problems:
        missing = [
            p.removesuffix(" matches no base module") for p in problems if p.endswith(" no base module")
        ]
        others = [p for p in problems if not p.endswith(" no base module")]
        said = [f"{name_summary(missing, noun='module')} match no base module"] if missing else []
        raise MissingKeys(
            f"{where}: {len(problems)} kohya module(s) do not resolve against the base: "
            f"{'; '.join(said + ([list_problems(others, 3)] if others else []))}; "
            "is the base the model the adapter was made for?"
        )
    return resolved


def _alpha(parts: Mapping[str, torch.Tensor], rank: int, stored: list[Any] | None) -> tuple[float, bool]:
    """(alpha, use_rslora): the stored pair when it gives the file's scale, else the file's alpha.

    A missing ``.alpha`` tensor means ``alpha = r`` (scale 1), as sd-scripts and ComfyUI read it.
    """
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
    if stored is not None:
        stored_alpha, rslora = float(stored[0]), bool(stored[1])
        if math.isclose(lora_scale(stored_alpha, rank, rslora), alpha / rank, rel_tol=1e-6, abs_tol=1e-12):
            return stored_alpha, rslora
    return alpha, False


def to_adapter(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    context: LoadContext | None = None,
    base_names: Iterable[str] | None = None,
    keep_stems: bool = False,
    source: str = "adapter",
) -> Adapter:
    """Build an Adapter from a kohya state dict (``context.source``, the file, names it in errors).

    Args:
        tensors: ``<stem>.lora_down.weight`` (r, in), ``<stem>.lora_up.weight`` (out, r),
            optional ``<stem>.alpha`` (0-d).
        metadata: the file's safetensors metadata (``ss_*``, and ``loratools_adapter`` if
            loratools wrote it).
        context: ``base_names`` — the base checkpoint's tensor names, needed to turn stems into
            dotted module paths unless the file carries them; ``keep_stems`` — without base
            names or a loratools record, name modules by their kohya stems (``lora_unet_…``)
            instead of refusing: enough for everything that needs no base (inspect, spectrum,
            similarity, resize, combine, kohya output).
        base_names, keep_stems, source: the same, for callers that pass no ``context``.

    Returns:
        The adapter, each module with ``scale = alpha / r`` as the file states it (or the
        original alpha/rsLoRA pair when the loratools record agrees with it).

    Raises:
        UnknownFormat: non-LoRA variants (LoHa, LoKr, DoRA, …), conv LoRA, broken pairs.
        MissingKeys: names that do not resolve, or no base to resolve them against.
    """
    if context is not None:
        base_names, keep_stems, source = context.base_names, context.keep_stems, context.source
    metadata = metadata or {}
    base_names = list(base_names) if base_names is not None else None
    if lycoris.is_lycoris_kohya(tensors):  # LoHa, LoKr, conv LoRA (LoCon): formats/lycoris.py
        stems = lycoris.kohya_to_weights(tensors, source)
        names = _module_names(stems, None, base_names, keep_stems)
        return lycoris.kohya_adapter({names[s]: w for s, w in stems.items()}, metadata, source)
    groups = _group(tensors)
    record = _stored(metadata, groups)
    names = _module_names(groups, record, base_names, keep_stems, source)
    modules = record["modules"] if record is not None else {}
    weights = {}
    for stem, parts in groups.items():
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        _check_module(stem, parts, source)
        alpha, rslora = _alpha(parts, int(down.shape[0]), modules.get(names[stem]))
        weights[names[stem]] = LoraWeight(down, up, alpha, rslora, magnitude=kohya_magnitude(stem, parts))
    validate.check_adapter(weights, source, {"a": "lora_down", "b": "lora_up"})
    # safetensors sorts its keys; restore the adapter's (or the base's) module order
    order = list(modules) if record is not None else [n.removesuffix(".weight") for n in base_names or []]
    position = {m: i for i, m in enumerate(order)}
    weights = dict(sorted(weights.items(), key=lambda item: position.get(item[0], len(position))))
    fields = record or {}
    return Adapter(
        weights=weights,
        base_model=fields.get("base_model"),
        task_type=fields.get("task_type"),
        fan_in_fan_out=bool(fields.get("fan_in_fan_out", False)),
        extra_config=dict(fields.get("extra_config") or {}),
        provenance=_provenance(metadata),
    )


def _check_module(stem: str, parts: Mapping[str, torch.Tensor], source: str) -> None:
    """The factors pair up and alpha, if stored, is one finite number (see formats/validate.py)."""
    validate.check_pair(
        stem, parts["lora_down.weight"], parts["lora_up.weight"], source, ("lora_down", "lora_up")
    )
    if "alpha" in parts:
        validate.scalar_alpha(parts["alpha"], f"{stem}.alpha", source)


def _module_names(
    groups: Mapping[str, Any],
    record: Mapping[str, Any] | None,
    base_names: list[str] | None,
    keep_stems: bool = False,
    source: str = "adapter",
) -> dict[str, str]:
    """stem → dotted module path: from the loratools record, else resolved against the base
    (else the stem itself, when ``keep_stems``)."""
    if record is not None:
        return {kohya_stem(m, record["prefix"]): m for m in record["modules"]}
    if base_names is not None:
        return resolve_stems(groups, base_names, source)
    if keep_stems:
        return {stem: stem for stem in groups}
    raise MissingKeys(
        "kohya module names are ambiguous ('_' stands for both '.' and '_'); pass the base model "
        "(--base BASE) so they can be resolved against its tensor names"
    )


def _provenance(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``loratools`` provenance entry, or ``{}`` when absent or not a JSON object."""
    try:
        value = json.loads(metadata.get("loratools", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- Adapter → kohya -------------------------------------------------------------------------------
def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def from_adapter(adapter: Adapter, prefix: str = DEFAULT_PREFIX) -> AdapterFiles:
    """The kohya state dict and safetensors metadata for ``adapter``.

    Each module's true scale becomes ``alpha_kohya / r``: rsLoRA modules get ``alpha · sqrt(r)``,
    per-module ranks and alphas are kept per module. Factors are stored unchanged; alpha is a
    0-d float32 tensor.

    Args:
        adapter: what to write.
        prefix: ``lora_<name>`` (one underscore), e.g. ``lora_unet``, ``lora_te``, ``lora_te1``.

    Returns:
        the tensors and metadata of one ``.safetensors`` file (no config: ``config`` is None).

    Raises:
        LoratoolsError: a bad prefix, or modules kohya cannot hold (``modules_to_save``, two
            modules that flatten to the same name).
    """
    if not PREFIX.match(prefix):
        raise LoratoolsError(
            f"--prefix {prefix!r}: expected 'lora_' plus letters/digits, e.g. lora_unet or lora_te1"
        )
    if adapter.saved_modules:
        raise LoratoolsError(
            f"the adapter holds fully trained modules ({list_problems(sorted(adapter.saved_modules))}); "
            "kohya LoRA files cannot carry them: convert to PEFT instead"
        )
    stems = Counter(kohya_stem(m, prefix) for m in adapter.weights)
    clashes = [s for s, n in stems.items() if n > 1]
    if clashes:
        raise LoratoolsError(f"modules that share a kohya name: {list_problems(clashes)}")
    tensors: dict[str, torch.Tensor] = {}
    for module, weight in adapter.lora_weights.items():
        plain = weight.with_plain_scaling()
        stem = kohya_stem(module, prefix)
        down, up = lycoris.stored_factors(plain)  # conv LoRA: (r, in, kh, kw), (out, r, 1, 1)
        tensors[f"{stem}.lora_down.weight"] = down  # (r, in)
        tensors[f"{stem}.lora_up.weight"] = up  # (out, r)
        tensors[f"{stem}.alpha"] = torch.tensor(plain.alpha, dtype=torch.float32)
        magnitude = getattr(weight, "magnitude", None)
        if magnitude is not None:  # LyCORIS' wd_on_out layout: (out, 1)
            tensors[f"{stem}.dora_scale"] = magnitude.reshape(-1, 1).contiguous()
    return AdapterFiles(tensors, _metadata(adapter, prefix))


def _metadata(adapter: Adapter, prefix: str) -> dict[str, str]:
    """sd-scripts' ``ss_*`` fields (the most common rank/alpha) plus the loratools record."""
    plain = [w.with_plain_scaling() for w in adapter.lora_weights.values()]
    rank = most_common([w.rank for w in plain], 0)
    alpha = most_common([w.alpha for w in plain if w.rank == rank], 0.0)
    record = {
        "prefix": prefix,
        "modules": [[m, w.alpha, w.use_rslora] for m, w in adapter.lora_weights.items()],
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "extra_config": dict(adapter.extra_config),
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _plain(alpha),
        ADAPTER_METADATA: json.dumps(record, sort_keys=True),
    }
    if adapter.base_model:
        metadata["ss_sd_model_name"] = adapter.base_model
    if adapter.provenance:
        metadata["loratools"] = json.dumps(dict(adapter.provenance), sort_keys=True)
    return metadata


def kohya_magnitude(stem: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The DoRA magnitude m (out,) of a kohya/LyCORIS module, from its ``dora_scale`` if any.

    LyCORIS stores ``dora_scale`` as (out, 1) when the norm is taken per output feature
    (``wd_on_out=True``, PEFT's DoRA, the default since LyCORIS 2.2) and as (1, in) when taken
    per input feature (``wd_on_out=False``). Only the first is PEFT's DoRA and is read; LyCORIS
    adds ``finfo(float32).eps`` ≈ 1.2e-7 to the norm, a relative difference far below rounding.

    Raises:
        UnknownFormat: a (1, in) ``dora_scale`` or a conv module's ``dora_scale``, by name.
    """
    scale = parts.get("dora_scale")
    if scale is None:
        return None
    out = int(parts["lora_up.weight"].shape[0])
    if parts["lora_down.weight"].ndim != 2 or scale.ndim > 2:
        raise UnknownFormat(f"{stem}: DoRA on a conv module is not supported, only DoRA on Linear modules")
    if tuple(scale.shape) != (out, 1):
        raise UnknownFormat(
            f"{stem}.dora_scale has shape {list(scale.shape)}: a norm per input feature "
            f"(LyCORIS wd_on_out=False) is not supported; only (out, 1) = ({out}, 1) is (PEFT's DoRA)"
        )
    return scale.reshape(out)
