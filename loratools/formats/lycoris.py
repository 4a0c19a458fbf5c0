"""The LyCORIS family — LoHa, LoKr, LoCon / conv LoRA — in kohya single files and PEFT folders.

Key names (``<module>`` is a kohya stem ``lora_unet_…``/``lora_te_…``/``lora_te1_…`` in a kohya or
LyCORIS file, ``base_model.model.<path>`` in a PEFT ``adapter_model.safetensors``)::

    LoHa   <module>.hada_w1_a (out, r)  .hada_w1_b (r, in·kh·kw)  .hada_w2_a  .hada_w2_b
           Tucker conv: .hada_t1/.hada_t2 (r, r, kh, kw), .hada_w*_a (r, out), .hada_w*_b (r, in)
    LoKr   <module>.lokr_w1 (a, c) | .lokr_w1_a (a, r) .lokr_w1_b (r, c)
           <module>.lokr_w2 (b, d[, kh, kw]) | .lokr_w2_a (b, r) .lokr_w2_b (r, d·kh·kw)
           Tucker conv: .lokr_t2 (r, r, kh, kw), .lokr_w2_a (r, b), .lokr_w2_b (r, d)
    LoCon  <module>.lora_down.weight (r, in, kh, kw)  .lora_up.weight (out, r, 1, 1)
           Tucker: .lora_down (r, in, 1, 1)  .lora_mid.weight (r, r, kh, kw)  .lora_up
    all    <module>.alpha (0-d), kohya/LyCORIS only; PEFT keeps r/alpha in adapter_config.json

Scale rules (checked against lycoris-lora's ``modules/{loha,lokr,locon}.py`` and PEFT's
``tuners/{loha,lokr}``; r is the ``lora_dim``, the rows of the ``*_b`` / ``lora_down`` tensor):

- LyCORIS LoHa, LoCon: ``alpha / r``; a missing or zero alpha means ``alpha = r`` (scale 1).
- LyCORIS LoKr: ``alpha / r`` when W1 or W2 is low-rank; **1 when both are full** (alpha ignored).
- PEFT LoHa and LoKr: ``alpha / r`` always, r and alpha from ``r``/``alpha`` and
  ``rank_pattern``/``alpha_pattern`` (so a PEFT LoKr with both factors full still uses alpha/r).
- rsLoRA in LyCORIS is folded into the stored alpha (``alpha·√r``), so the rules above hold.

A LoCon Tucker core is folded at load time into a plain conv LoRA (``A = mid ×₂ down``, exact); conv
LoRA is a :class:`~loratools.adapter.LoraWeight` with ``weight_shape`` (out, in, kh, kw). A conv LoHa
or LoKr whose kernel is stored flattened (``hada_w1_b`` (r, in·kh·kw)) keeps ``weight_shape=None``
without a base: its 2-D ΔW is exact, and merge reshapes it onto the base's conv weight.

Not supported, refused by name: OFT, BOFT, GLoRA, IA³, full/diff, norm differences, and
LyCORIS's weight decomposition (``dora_scale``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight, ModuleWeight
from loratools.errors import InvalidAdapter, UnknownFormat, list_problems
from loratools.formats.detect import network_args
from loratools.formats.validate import scalar_alpha
from loratools.kinds.loha import LohaWeight
from loratools.kinds.lokr import LokrWeight

__all__ = [
    "LOHA_PARTS",
    "LOKR_PARTS",
    "UNSUPPORTED_PARTS",
    "conv_lora",
    "describe",
    "is_lycoris_kohya",
    "kohya_adapter",
    "kohya_to_weights",
    "lycoris_lokr_scale",
    "network_summary",
    "peft_adapter",
    "peft_to_weights",
    "stored_factors",
]

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOCON_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
# parts of the LyCORIS algorithms loratools does not model (their ΔW is not a fixed low-rank form)
UNSUPPORTED_PARTS = {
    "oft_blocks": "OFT/BOFT (orthogonal fine-tuning)",
    "oft_diag": "OFT (orthogonal fine-tuning)",
    "rescale": "OFT/BOFT (orthogonal fine-tuning)",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA",
    "on_input": "IA³", "weight": "IA³",
    "diff": "a full weight difference (full/diff)", "diff_b": "a full bias difference (full/diff)",
    "w_norm": "a norm-layer difference", "b_norm": "a norm-layer difference",
    "dora_scale": "LyCORIS weight decomposition (DoRA, dora_scale)",
}  # fmt: skip
PEFT_LYCORIS_TYPES = {"LOHA": "LoHa", "LOKR": "LoKr"}
# ss_* metadata worth showing in inspect (sd-scripts' training record)
TRAINING_FIELDS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_num_epochs", "ss_max_train_steps",
    "ss_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_mixed_precision",
    "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
)  # fmt: skip
KOHYA_PARTS = (*LOHA_PARTS, *LOKR_PARTS, *LOCON_PARTS, "alpha")


# -- the shared rules -----------------------------------------------------------------------------
def _alpha_or_dim(alpha: float | None, dim: int) -> float:
    """LyCORIS and sd-scripts: a missing alpha, or alpha 0, means alpha = r (scale 1)."""
    return float(dim) if alpha is None or alpha == 0 else float(alpha)


def lycoris_lokr_scale(alpha: float | None, dim: int | None) -> float:
    """LyCORIS's LoKr scale: ``alpha / r`` if a factor is low-rank (``dim`` = its r), else 1."""
    return 1.0 if dim is None else _alpha_or_dim(alpha, dim) / dim


def conv_lora(
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float,
    use_rslora: bool = False,
    mid: torch.Tensor | None = None,
) -> LoraWeight:
    """A conv LoRA (kohya LoCon, PEFT Conv2d LoRA) as a LoraWeight on the flattened kernel.

    Args:
        down: ``lora_down``/``lora_A`` (r, in, kh, kw) — (r, in, 1, 1) with a Tucker ``mid``.
        up: ``lora_up``/``lora_B`` (out, r, 1, 1).
        alpha: the module's alpha (scale alpha / r).
        use_rslora: PEFT's ``use_rslora``.
        mid: LyCORIS's ``lora_mid`` (r, r, kh, kw), folded exactly into A:
            ``A[i, (c, k)] = Σ_j mid[i, j, k] · down[j, c]``.

    Returns:
        LoraWeight with A (r, in·kh·kw), B (out, r) and ``weight_shape`` (out, in, kh, kw).
    """
    b = up.reshape(up.shape[0], -1)  # (out, r)
    if mid is None:
        return LoraWeight(
            down.reshape(down.shape[0], -1), b, alpha, use_rslora, weight_shape=(b.shape[0], *down.shape[1:])
        )
    folded = torch.einsum("ijk,jc->ick", mid.float().flatten(2), down.float().flatten(1))  # (r, in, K)
    a = folded.reshape(folded.shape[0], -1).to(down.dtype)
    return LoraWeight(a, b, alpha, use_rslora, weight_shape=(b.shape[0], down.shape[1], *mid.shape[2:]))


def stored_factors(weight: LoraWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as files store them: conv LoRA as ``lora_down``/``lora_A`` (r, in, kh, kw) and
    ``lora_up``/``lora_B`` (out, r, 1, 1), from ``weight_shape``; otherwise (r, in) and (out, r)."""
    a, b = weight.a.contiguous(), weight.b.contiguous()
    shape = weight.weight_shape
    if shape is None or len(shape) <= 2:
        return a, b
    ones = (1,) * (len(shape) - 2)
    return a.reshape(weight.rank, *shape[1:]), b.reshape(shape[0], weight.rank, *ones)


def _loha(parts: Mapping[str, torch.Tensor], alpha: float | None) -> LohaWeight:
    w1_a, w1_b, t1 = parts["hada_w1_a"], parts["hada_w1_b"], parts.get("hada_t1")
    weight_shape: tuple[int, ...] | None = None
    if t1 is not None:  # (r, r, *k) with w1_a (r, out), w1_b (r, in)
        weight_shape = (int(w1_a.shape[1]), int(w1_b.shape[1]), *t1.shape[2:])
    elif w1_b.ndim > 2:  # (r, in, *k)
        weight_shape = (int(w1_a.shape[0]), *w1_b.shape[1:])
    return LohaWeight(
        w1_a, w1_b, parts["hada_w2_a"], parts["hada_w2_b"],
        alpha=_alpha_or_dim(alpha, int(w1_b.shape[0])), t1=t1, t2=parts.get("hada_t2"), weight_shape=weight_shape,
    )  # fmt: skip


def _lokr(parts: Mapping[str, torch.Tensor], alpha: float | None, scale: float | None) -> LokrWeight:
    """A LoKr module; ``scale`` None means LyCORIS's rule (1 when both factors are full)."""
    w1, w2, t2 = parts.get("lokr_w1"), parts.get("lokr_w2"), parts.get("lokr_t2")
    w1_a, w1_b, w2_a, w2_b = (parts.get(f"lokr_w{i}_{s}") for i in (1, 2) for s in ("a", "b"))
    rows1, cols1 = w1.shape if w1 is not None else (_dim(w1_a, 0), _dim(w1_b, 1))
    kernel: tuple[int, ...] | None = None
    if t2 is not None:
        rows2, cols2, kernel = _dim(w2_a, 1), _dim(w2_b, 1), tuple(t2.shape[2:])
    elif w2 is not None:
        rows2, cols2, kernel = int(w2.shape[0]), int(w2.shape[1]), tuple(w2.shape[2:]) or None
    else:
        rows2, cols2 = _dim(w2_a, 0), _dim(w2_b, 1)
        kernel = tuple(w2_b.shape[2:]) if w2_b is not None and w2_b.ndim > 2 else None
    weight_shape = (int(rows1) * rows2, int(cols1) * cols2, *kernel) if kernel else None
    down = w1_b if w1_b is not None else w2_b
    dim = None if down is None else int(down.shape[0])
    value = _alpha_or_dim(alpha, dim) if dim is not None else float(alpha or 0.0)
    if scale is None:
        scale = lycoris_lokr_scale(alpha, dim)
    return LokrWeight(
        w1, w1_a, w1_b, w2, w2_a, w2_b, alpha=value, scale=scale, t2=t2, weight_shape=weight_shape
    )


def _dim(t: torch.Tensor | None, axis: int) -> int:
    if t is None:
        raise InvalidAdapter("a LoKr factor is incomplete: lokr_w*_a comes with lokr_w*_b")
    return int(t.shape[axis])


# -- kohya / LyCORIS single files -----------------------------------------------------------------
def _split_key(key: str) -> tuple[str, str]:
    """``lora_unet_x.hada_w1_a`` → (``lora_unet_x``, ``hada_w1_a``)."""
    stem, _, part = key.partition(".")
    return stem, part


def is_lycoris_kohya(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a kohya-named state dict holds anything beyond Linear LoRA (LoHa, LoKr, conv LoRA,
    a LoCon core or an unsupported LyCORIS algorithm) — the files :func:`kohya_to_weights` reads."""
    for key, tensor in tensors.items():
        part = _split_key(key)[1]
        if part in LOHA_PARTS or part in LOKR_PARTS or part == "lora_mid.weight":
            return True
        if part in UNSUPPORTED_PARTS and part != "dora_scale":  # kohya.py reads LoRA + dora_scale
            return True
        if part == "lora_down.weight" and tensor.ndim == 4:
            return True
    return False


def _group(tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by stem; refuses unsupported LyCORIS algorithms by name and unknown tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported: dict[str, list[str]] = {}
    unknown = []
    for key, tensor in tensors.items():
        stem, part = _split_key(key)
        if part in KOHYA_PARTS:
            groups.setdefault(stem, {})[part] = tensor
        elif part in UNSUPPORTED_PARTS:
            unsupported.setdefault(UNSUPPORTED_PARTS[part], []).append(key)
        else:
            unknown.append(key)
    if unsupported:
        algo, keys = next(iter(unsupported.items()))
        raise UnknownFormat(
            f"{where}: holds {algo} modules ({list_problems(keys)}), which loratools does not support; "
            "only LoRA, LoCon, LoHa and LoKr load"
        )
    if unknown:
        raise UnknownFormat(f"{where}: tensors of no LoRA/LyCORIS kind: {list_problems(unknown)}")
    return groups


def _kohya_module(stem: str, parts: Mapping[str, torch.Tensor], where: str = "adapter") -> ModuleWeight:
    alpha = scalar_alpha(parts["alpha"], f"{stem}.alpha", where) if "alpha" in parts else None
    groups = (("LoHa", LOHA_PARTS), ("LoKr", LOKR_PARTS), ("LoRA", LOCON_PARTS))
    kinds = [kind for kind, names in groups if any(p in parts for p in names)]
    if len(kinds) > 1:
        raise InvalidAdapter(f"{stem}: holds {' and '.join(kinds)} tensors; a module has one kind")
    if kinds == ["LoHa"]:
        missing = [p for p in LOHA_PARTS[:4] if p not in parts]
        if missing:
            raise InvalidAdapter(f"{stem}: a LoHa module without {', '.join(missing)}")
        return _loha(parts, alpha)
    if kinds == ["LoKr"]:
        return _lokr(parts, alpha, scale=None)
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise InvalidAdapter(f"{stem}: a LoRA module needs both lora_down and lora_up")
    down, up, mid = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("lora_mid.weight")
    rank = int(down.shape[0])
    if mid is not None and (
        mid.ndim < 3 or tuple(mid.shape[:2]) != (rank, rank) or down[0].numel() != down.shape[1]
    ):
        raise InvalidAdapter(
            f"{stem}: lora_mid {tuple(mid.shape)} with lora_down {tuple(down.shape)}; a LoCon core is "
            "(r, r, kh, kw) between lora_down (r, in, 1, 1) and lora_up (out, r, 1, 1)"
        )
    if down.ndim == 2 and mid is None:
        return LoraWeight(down, up, _alpha_or_dim(alpha, rank))
    return conv_lora(down, up, _alpha_or_dim(alpha, rank), mid=mid)


def kohya_to_weights(tensors: Mapping[str, torch.Tensor], where: str = "adapter") -> dict[str, ModuleWeight]:
    """kohya stem → module weight for a kohya/LyCORIS file (LoRA, LoCon, LoHa, LoKr, mixed).

    Args:
        tensors: ``<stem>.<part>`` → tensor (parts as in the module docstring).
        where: the file, for messages.

    Raises:
        UnknownFormat: an unsupported LyCORIS algorithm (named) or tensors of no known kind.
        InvalidAdapter: a module with missing or misfitting factors.
    """
    weights: dict[str, ModuleWeight] = {}
    for stem, parts in _group(tensors, where).items():
        try:
            weights[stem] = _kohya_module(stem, parts, where)
        except ValueError as exc:  # factor shapes that do not fit together
            raise InvalidAdapter(f"{where}: {stem}: {exc}") from None
    return weights


def network_summary(metadata: Mapping[str, str]) -> dict[str, Any]:
    """What sd-scripts recorded about training: the algorithm (``ss_network_module`` +
    ``ss_network_args.algo``), dims, and the ``ss_*`` training fields that are present."""
    args = network_args(metadata)
    module = metadata.get("ss_network_module", "")
    algo = str(args.get("algo", "")).lower() or ("lora" if module == "networks.lora" else "")
    summary: dict[str, Any] = {"network_module": module or None, "algo": algo or None}
    summary["network_args"] = args
    summary["training"] = {k.removeprefix("ss_"): metadata[k] for k in TRAINING_FIELDS if k in metadata}
    return summary


# -- PEFT LOHA / LOKR folders ----------------------------------------------------------------------
def peft_to_weights(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> tuple[dict[str, ModuleWeight], dict[str, torch.Tensor]]:
    """(module path → weight, other tensors) for a PEFT ``LOHA``/``LOKR`` state dict.

    Keys are ``base_model.model.<module>.<part>`` (no ``.weight``); PEFT's scale is ``alpha / r``
    for both kinds, with per-module ``rank_pattern``/``alpha_pattern``. Tensors that are no factor
    (``modules_to_save`` copies) come back apart, by their name without the prefix.

    Raises:
        UnknownFormat: a peft_type other than LOHA/LOKR.
        InvalidAdapter: a module with missing or misfitting factors.
    """
    from loratools.formats.peft import PREFIX, pattern_value  # peft imports this module

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_LYCORIS_TYPES:
        raise UnknownFormat(f"a PEFT {peft_type} adapter is not LoHa or LoKr")
    parts_of = LOHA_PARTS if peft_type == "LOHA" else LOKR_PARTS
    groups: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".")
        if part in parts_of:
            groups.setdefault(module, {})[part] = tensor
        else:
            others[key.removeprefix(PREFIX)] = tensor
    r, alpha = config.get("r", 8), config.get("alpha", config.get("r", 8))
    weights: dict[str, ModuleWeight] = {}
    for module in sorted(groups):
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, r))
        value = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        try:
            weights[module] = (
                _loha(groups[module], value)
                if peft_type == "LOHA"
                else _lokr(groups[module], value, value / rank)
            )
        except (ValueError, KeyError) as exc:
            raise InvalidAdapter(f"{module}: PEFT {peft_type} factors do not fit ({exc})") from None
    return weights, others


def peft_adapter(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], provenance: Mapping[str, Any], source: str
) -> Adapter:
    """An Adapter from a PEFT LoHa/LoKr folder's tensors and adapter_config.json (``source`` names it)."""
    from loratools.formats import validate

    weights, others = peft_to_weights(tensors, config)
    if not weights:
        raise InvalidAdapter(f"{source}: a PEFT {config.get('peft_type')} adapter without any factor tensors")
    validate.check_adapter(weights, source)
    target = config.get("target_modules")
    return Adapter(
        weights=weights,
        saved_modules=others,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        # LoHa/LoKr config fields mean nothing to a LoRA written from this adapter: keep targets only
        extra_config={"target_modules": target} if target is not None else {},
        provenance=dict(provenance),
    )


# -- inspect ---------------------------------------------------------------------------------------
def describe(weight: ModuleWeight) -> dict[str, Any]:
    """One module for ``inspect``: kind, delta shape, weight shape, rank, alpha, scale, factor shapes."""
    info: dict[str, Any] = {
        "kind": weight.kind,
        "shape": list(weight.shape),
        "weight_shape": list(weight.weight_shape) if weight.weight_shape is not None else None,
        "rank": weight.rank,
    }
    if isinstance(weight, LohaWeight | LokrWeight):
        core = weight.t1 if isinstance(weight, LohaWeight) else weight.t2  # the Tucker core, if any
        info |= {"dim": weight.dim, "alpha": weight.alpha, "scale": weight.scale, "tucker": core is not None}
    elif isinstance(weight, LoraWeight):
        info |= {"dim": weight.rank, "alpha": weight.alpha, "scale": weight.scale}
    tensors = weight.tensors() if isinstance(weight, LohaWeight | LokrWeight) else {}
    info["factors"] = {name: list(t.shape) for name, t in tensors.items()}
    return info


def module_kinds(weights: Iterable[ModuleWeight]) -> dict[str, int]:
    """How many modules of each kind (``{"lokr": 12, "lora": 4}``)."""
    counts: dict[str, int] = {}
    for weight in weights:
        counts[weight.kind] = counts.get(weight.kind, 0) + 1
    return counts


def kohya_adapter(weights: Mapping[str, ModuleWeight], metadata: Mapping[str, str], source: str) -> Adapter:
    """An Adapter of kohya/LyCORIS modules (already named), with sd-scripts' training record."""
    from loratools.formats import validate

    validate.check_adapter(weights, source)
    return Adapter(weights=dict(weights), provenance={"kohya": network_summary(metadata)})
