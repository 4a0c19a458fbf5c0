"""Fused 3-D expert tensors: PEFT's ``target_parameters`` LoRA, one plain LoRA per expert.

Newer mixture-of-experts layouts (gpt-oss on disk; transformers 5 in memory) keep all experts of
a projection in one parameter ``W`` of shape (E, p, q). PEFT adapts such a parameter with a
``ParamWrapper`` (``peft/tuners/lora/layer.py``) that stores every expert's factors in two
matrices, with rank r shared by the experts::

    lora_A.weight  (E·r, in)     expert e's A_e = lora_A[e·r:(e+1)·r]       (r, in)
    lora_B.weight  (out, E·r)    expert e's B_e = lora_B[:, e::E]            (out, r)
                                 (PEFT reshapes B to (out, r, E): column j·E + e)

and, with ``s = alpha/r`` (rsLoRA ``alpha/√r``), ``get_delta_weight`` gives the slice ``ΔW[e]``
(p, q) as

    s · B_e @ A_e          when W is (E, out, in)   (in = q, out = p: most models)
    s · (B_e @ A_e)ᵀ       when W is (E, in, out)   (the module's ``is_transposed``: gpt-oss)

loratools keeps each (parameter, expert) as one :class:`~loratools.adapter.LoraWeight` named
``<parameter>[e]`` (e.g. ``model.layers.0.mlp.experts.gate_up_proj[3]``) in the slice's own
(p, q) layout — for the transposed case A' = B_eᵀ (r, q), B' = A_eᵀ (p, r) — so spectrum sees
ordinary 2-D modules and a merge adds ``L @ R`` to ``W[e]``. It is an :class:`ExpertLora`, which
also remembers the fused parameter and the wrapper, so that the adapter can be written back.

Keys. Several targeted parameters of one module nest wrappers; PEFT wraps them in the module's
parameter registration order, so the *last* targeted parameter is the outermost wrapper::

    base_model.model.<module>.lora_A.weight                   last targeted parameter
    base_model.model.<module>.base_layer.lora_A.weight        the one before, …

The file does not say E, the parameters' names nor the layout: they come from the base
(:func:`resolve_wrappers`) and, where the slice is square, from the model class
(:data:`TRANSPOSED_CLASSES`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import MissingKeys, ShapeMismatch, UnknownFormat, list_problems

__all__ = [
    "FUSED_NAME",
    "TRANSPOSED_CLASSES",
    "ExpertLora",
    "FusedParam",
    "expert_lora",
    "from_peft",
    "fused_layout",
    "fused_name",
    "keep_layout",
    "merge_fused",
    "peft_patterns",
    "peft_prefix",
    "peft_tensors",
    "read_peft",
    "resolve_wrappers",
    "split_experts",
    "to_peft",
    "wrapper_depths",
]

# ``<parameter>[<expert>]``: brackets never occur in checkpoint names, so the split is unambiguous
FUSED_NAME = re.compile(r"^(?P<param>.+)\[(?P<expert>\d+)\]$")
# transformers models whose fused experts are (E, in, out) (the experts module's ``is_transposed``),
# by the prefix of the class PEFT records in ``auto_mapping.base_model_class``
TRANSPOSED_CLASSES = ("GptOss", "Aria", "OpenaiPrivacyFilter")
# ``<module>(.base_layer)*.lora_A.weight``: the nesting depth is the number of ``base_layer``
WRAPPER_KEY = re.compile(
    r"^(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


@dataclass(frozen=True)
class FusedParam:
    """One fused expert parameter of the base and how PEFT's wrapper maps onto it.

    Attributes:
        name: the base tensor name (``model.layers.0.mlp.experts.gate_up_proj``).
        shape: its shape (E, p, q).
        transposed: the slices are (in, out) (PEFT's ``is_transposed``), so ΔW[e] = s·(B_e A_e)ᵀ.
    """

    name: str
    shape: tuple[int, int, int]
    transposed: bool

    @property
    def num_experts(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class ExpertLora(LoraWeight):
    """One expert's slice of a fused parameter: a plain LoRA (every op treats it as one) that
    remembers where it came from, so it can be merged into ``W[expert]`` and written back.

    Attributes:
        param: the fused base parameter (None only as the dataclass default).
        expert: the slice index e.
        depth: the nesting depth of its PEFT wrapper (0 = outermost).
        module: the wrapped module's path as the adapter names it (PEFT keys are built on it).
    """

    param: FusedParam | None = None
    expert: int = 0
    depth: int = 0
    module: str = ""


def fused_name(param: str, expert: int) -> str:
    """The module name of one expert's slice: ``param[expert]``."""
    return f"{param}[{expert}]"


def peft_prefix(module: str, depth: int) -> str:
    """The key prefix of the wrapper ``depth`` levels inside the outermost (0 = outermost)."""
    return module + ".base_layer" * depth


def from_peft(
    a: torch.Tensor,
    b: torch.Tensor,
    param: FusedParam,
    alpha: float,
    use_rslora: bool = False,
    depth: int = 0,
    module: str = "",
) -> dict[str, ExpertLora]:
    """Split one ParamWrapper's ``lora_A`` (E·r, in), ``lora_B`` (out, E·r) into per-expert LoRAs.

    Returns:
        ``param[e]`` → LoraWeight whose ``delta()`` is ΔW[e] in the slice layout (p, q).

    Raises:
        ShapeMismatch: the factors do not fit ``param`` in its layout.
    """
    _check_fit(a, b, param)
    experts = param.num_experts
    rank = a.shape[0] // experts
    weights: dict[str, ExpertLora] = {}
    for e in range(experts):
        a_e, b_e = a[e * rank : (e + 1) * rank], b[:, e::experts]  # (r, in), (out, r)
        if param.transposed:  # slice (in, out) = s·A_eᵀ B_eᵀ
            a_e, b_e = b_e.T, a_e.T  # (r, out), (in, r)
        a_e, b_e = a_e.contiguous(), b_e.contiguous()
        weights[fused_name(param.name, e)] = ExpertLora(
            a_e, b_e, alpha, use_rslora, param=param, expert=e, depth=depth, module=module
        )
    return weights


def to_peft(weights: Mapping[str, LoraWeight], param: FusedParam) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`from_peft`: ``(lora_A (E·r, in), lora_B (out, E·r))`` for PEFT.

    Every expert must be present with one rank, alpha and rsLoRA flag (PEFT stores one r and alpha
    per parameter). Factors keep their dtype.

    Raises:
        ShapeMismatch: an expert missing, or experts that differ in rank, alpha or scaling rule.
    """
    names = [fused_name(param.name, e) for e in range(param.num_experts)]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ShapeMismatch(
            f"{param.name}: PEFT stores all {param.num_experts} experts; missing {missing[:3]}"
        )
    experts = [weights[n] for n in names]
    if len({(w.rank, w.alpha, w.use_rslora) for w in experts}) != 1:
        raise ShapeMismatch(
            f"{param.name}: PEFT stores one rank and alpha for all experts of a fused parameter; "
            "resize the experts to one rank (loratools resize -r R) first"
        )
    pairs = [(w.b.T, w.a.T) if param.transposed else (w.a, w.b) for w in experts]  # (r, in), (out, r)
    a = torch.cat([p[0] for p in pairs])  # (E·r, in)
    b = torch.stack([p[1] for p in pairs], dim=2).flatten(1)  # (out, r, E) → (out, r·E), column j·E + e
    return a.contiguous(), b.contiguous()


def merge_fused(
    base: torch.Tensor, weights: Mapping[str, LoraWeight], param: str, scale: float = 1.0
) -> torch.Tensor:
    """``W[e] + scale · L_e @ R_e`` for every expert of ``param`` present in ``weights``, in float32.

    Args:
        base: the fused parameter (E, p, q), any float dtype.
        weights: modules named ``param[e]`` (others are ignored).
        param: the base tensor name.
        scale: the adapter's merge weight.

    Returns:
        The merged parameter (E, p, q) in float32.
    """
    merged = base.float().clone()
    for name, weight in weights.items():
        match = FUSED_NAME.match(name)
        if match is None or match["param"] != param:
            continue
        left, right = weight.scaled_factors()  # (p, r), (r, q)
        merged[int(match["expert"])].addmm_(left, right, alpha=scale)
    return merged


def resolve_wrappers(
    wrappers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: Sequence[tuple[str, tuple[int, int, int]]],
    transposed: bool | None = None,
) -> list[FusedParam]:
    """Which base parameter, in which layout, each nested wrapper of one module adapts.

    Args:
        wrappers: ``(lora_A, lora_B)`` per nesting depth, outermost first.
        params: the module's targeted fused parameters (name, (E, p, q)). Their registration
            order (PEFT's nesting order) is not in any file, so shapes decide.
        transposed: the model's layout where known (``TRANSPOSED_CLASSES``); needed only when a
            wrapper fits a square slice both ways.

    Returns:
        One FusedParam per wrapper, in the order of ``wrappers``.

    Raises:
        ShapeMismatch: no assignment fits the shapes, or several do.
    """
    if len(wrappers) != len(params):
        raise ShapeMismatch(
            f"{len(wrappers)} nested LoRA wrappers but {len(params)} fused parameters to adapt"
        )
    fits = [[_layouts(a, b, shape, transposed) for _, shape in params] for a, b in wrappers]
    choices = []
    for order in itertools.permutations(range(len(params))):
        if all(len(fits[d][p]) == 1 for d, p in enumerate(order)):
            choices.append(order)
    if len(choices) != 1:
        why = "fit none of their shapes" if not choices else "fit their shapes in several ways"
        raise ShapeMismatch(
            f"the LoRA factors of {[n for n, _ in params]} {why} {[s for _, s in params]}"
            + (" (a square slice fits both layouts: the model's layout is needed)" if not choices else "")
        )
    order = choices[0]
    return [FusedParam(params[p][0], params[p][1], fits[d][p][0]) for d, p in enumerate(order)]


def _layouts(
    a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int, int], transposed: bool | None
) -> list[bool]:
    """The layouts (transposed or not) in which ``(a, b)`` fits a fused parameter of ``shape``."""
    experts, p, q = shape
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] % experts:
        return []
    found = [
        t
        for t, fit in (
            (False, (b.shape[0], a.shape[1]) == (p, q)),
            (True, (a.shape[1], b.shape[0]) == (p, q)),
        )
        if fit
    ]
    if len(found) == 2 and transposed is not None:
        found = [transposed]
    return found


def _check_fit(a: torch.Tensor, b: torch.Tensor, param: FusedParam) -> None:
    if param.transposed not in _layouts(a, b, param.shape, param.transposed):
        raise ShapeMismatch(
            f"{param.name}: LoRA factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the fused "
            f"parameter {param.shape} ({'(E, in, out)' if param.transposed else '(E, out, in)'})"
        )


def read_peft(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    base_shapes: Mapping[str, tuple[int, ...]],
    alpha_of: Any,
    use_rslora: bool,
    source: str,
) -> tuple[dict[str, torch.Tensor], dict[str, LoraWeight]]:
    """Take PEFT's ``target_parameters`` wrappers out of an adapter's tensors, one LoRA per expert.

    Args:
        tensors: the adapter's tensors by PEFT key.
        config: adapter_config.json (``target_parameters``, ``auto_mapping``).
        base_shapes: the base's tensor name → shape (the fused parameters are found here).
        alpha_of: PEFT's key of a targeted parameter (``<module>.<parameter>``) → its alpha
            (PEFT's lora_alpha/alpha_pattern rule).
        use_rslora: scale by alpha/√r.
        source: the adapter, for messages.

    Returns:
        (the other tensors, ``param[e]`` → :class:`ExpertLora`).

    Raises:
        MissingKeys: a targeted parameter that is not a 3-D tensor of the base.
        ShapeMismatch: factors that fit no targeted parameter (see :func:`resolve_wrappers`).
    """
    targets = [str(t) for t in config.get("target_parameters") or []]
    owners = {t.rpartition(".")[0] for t in targets}
    wrappers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    rest = {}
    for key, tensor in tensors.items():
        match = WRAPPER_KEY.match(key.removeprefix("base_model.model."))
        if match and any(match["module"] == o or match["module"].endswith("." + o) for o in owners):
            depth = match["nest"].count(".base_layer")
            wrappers.setdefault(match["module"], {}).setdefault(depth, {})[match["side"]] = tensor
        else:
            rest[key] = tensor
    hint = _transposed_hint(config)
    weights: dict[str, LoraWeight] = {}
    problems = []
    for module, nested in sorted(wrappers.items()):
        params = _targeted_params(module, targets, base_shapes)
        if len(params) != len(nested) or any(len(nested[d]) != 2 for d in range(len(nested))):
            problems.append(f"{module}: {len(nested)} LoRA wrappers for {len(params)} fused base parameters")
            continue
        pairs = [(nested[d]["A"], nested[d]["B"]) for d in range(len(nested))]
        try:
            resolved = resolve_wrappers(pairs, params, hint)
        except ShapeMismatch as exc:  # name the file, and how to give the layout
            raise ShapeMismatch(
                f"{source}: {exc}; PEFT records the model class in adapter_config.json "
                '"auto_mapping": {"base_model_class": …} (gpt-oss: GptOssForCausalLM)'
            ) from None
        for depth, ((a, b), param) in enumerate(zip(pairs, resolved, strict=True)):
            alpha = float(alpha_of(f"{module}.{param.name.rpartition('.')[2]}"))  # PEFT's key for it
            weights.update(from_peft(a, b, param, alpha, use_rslora, depth, module))
    if problems:
        raise MissingKeys(
            f"{source}: target_parameters that fit no 3-D base tensor: {list_problems(problems)}"
        )
    return rest, weights


def _targeted_params(
    module: str, targets: Sequence[str], base_shapes: Mapping[str, tuple[int, ...]]
) -> list[tuple[str, tuple[int, int, int]]]:
    """The module's targeted fused parameters in the base: exact name, else a unique suffix match."""
    found = []
    for target in targets:
        owner, _, leaf = target.rpartition(".")
        if not (module == owner or module.endswith("." + owner)):
            continue
        name = f"{module}.{leaf}"
        hits = (
            [name]
            if name in base_shapes
            else [b for b in base_shapes if b.endswith("." + name) or name.endswith("." + b)]
        )
        if len(hits) == 1 and len(base_shapes[hits[0]]) == 3:
            found.append((hits[0], tuple(base_shapes[hits[0]])))
    return found  # type: ignore[return-value]


def _transposed_hint(config: Mapping[str, Any]) -> bool | None:
    """True for models known to store experts (E, in, out); None when the config does not say."""
    mapping = config.get("auto_mapping")
    name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return True if isinstance(name, str) and name.startswith(TRANSPOSED_CLASSES) else None


def _by_parameter(weights: Mapping[str, LoraWeight]) -> dict[str, list[ExpertLora]]:
    """The expert modules grouped by PEFT's key for their parameter, ``<wrapped module>.<parameter leaf>``.

    Raises:
        UnknownFormat: a module whose fused layout is unknown (made by an op that forgot it).
    """
    groups: dict[str, list[ExpertLora]] = {}
    for name, weight in weights.items():
        if not isinstance(weight, ExpertLora) or weight.param is None:
            raise UnknownFormat(
                f"module {name} is one expert of a fused tensor, but its layout was not kept; "
                "write the adapter read from PEFT (or merge it) instead"
            )
        module = weight.module or weight.param.name.rpartition(".")[0]
        groups.setdefault(f"{module}.{weight.param.name.rpartition('.')[2]}", []).append(weight)
    return groups


def peft_patterns(
    weights: Mapping[str, LoraWeight], rank: int, alpha: float
) -> tuple[dict[str, int], dict[str, float]]:
    """``rank_pattern`` and ``alpha_pattern`` entries for the fused parameters whose r or alpha is
    not the config's ``r``/``lora_alpha``. PEFT matches the patterns of a targeted parameter against
    ``<module>.<parameter>`` (``model.layers.0.mlp.experts.gate_up_proj``), one r per parameter;
    :func:`to_peft` checks that its experts share it."""
    ranks, alphas = {}, {}
    for key, experts in _by_parameter(weights).items():
        if experts[0].rank != rank:
            ranks[key] = experts[0].rank
        if experts[0].alpha != alpha:
            alphas[key] = experts[0].alpha
    return ranks, alphas


def peft_tensors(weights: Mapping[str, LoraWeight], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT's ``target_parameters`` keys and tensors for the expert modules of an adapter.

    Args:
        weights: the ``param[e]`` modules (every one an :class:`ExpertLora` with its layout).
        rank, alpha: the adapter config's ``r`` and ``lora_alpha``; parameters with another
            rank or alpha need the :func:`peft_patterns` entries in the config.

    Raises:
        UnknownFormat: a module whose fused layout is unknown (made by an op that forgot it).
        ShapeMismatch: a parameter's experts that differ in rank or alpha (see :func:`to_peft`).
    """
    del rank, alpha  # kept for the call sites: the patterns carry what differs
    _by_parameter(weights)
    groups: dict[str, dict[str, LoraWeight]] = {}
    first: dict[str, ExpertLora] = {}
    for name, weight in weights.items():
        assert isinstance(weight, ExpertLora) and weight.param is not None  # checked above
        groups.setdefault(weight.param.name, {})[name] = weight
        first.setdefault(weight.param.name, weight)
    tensors = {}
    for param_name, group in groups.items():
        expert = first[param_name]
        assert expert.param is not None  # checked above
        a, b = to_peft(group, expert.param)
        prefix = "base_model.model." + peft_prefix(
            expert.module or param_name.rpartition(".")[0], expert.depth
        )
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    return tensors


# -- making expert modules (extract): the layout and the nesting PEFT will use -------------------

# the order in which transformers' experts modules register their fused parameters; PEFT nests a
# wrapper per targeted parameter in this order, so the last one is the outermost (depth 0)
REGISTRATION_ORDER = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2")
# projections whose input side is the hidden size (the others' output side is)
INPUT_PROJECTIONS = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3")


def wrapper_depths(params: Sequence[str]) -> dict[str, int]:
    """The nesting depth PEFT gives each targeted fused parameter (0 = outermost), by module.

    PEFT wraps a module's targeted parameters in their registration order, which no checkpoint
    records; transformers' experts modules register gate/up before down
    (:data:`REGISTRATION_ORDER`), other names follow in alphabetical order.
    """
    modules: dict[str, list[str]] = {}
    for param in params:
        modules.setdefault(param.rpartition(".")[0], []).append(param)

    def order(param: str) -> tuple[int, str]:
        leaf = param.rpartition(".")[2]
        known = leaf in REGISTRATION_ORDER
        return (REGISTRATION_ORDER.index(leaf) if known else len(REGISTRATION_ORDER), leaf)

    depths = {}
    for names in modules.values():
        ordered = sorted(names, key=order)
        depths.update({name: len(ordered) - 1 - i for i, name in enumerate(ordered)})
    return depths


def fused_layout(name: str, shape: Sequence[int], model_class: str | None, hidden: int | None) -> bool:
    """Whether the fused parameter ``name`` (E, p, q) stores its slices (in, out) (PEFT's ``is_transposed``).

    The model class decides when known (:data:`TRANSPOSED_CLASSES`, from config.json's
    ``architectures``); otherwise the hidden size does: gate/up projections read it (their ``in``),
    down projections write it (their ``out``).

    Raises:
        ShapeMismatch: neither says (no model class, and the slice is square or does not show the
            hidden size).
    """
    if model_class is not None:
        return model_class.startswith(TRANSPOSED_CLASSES)
    p, q = int(shape[1]), int(shape[2])
    if hidden is not None and p != q and hidden in (p, q):
        reads_hidden = name.rpartition(".")[2] in INPUT_PROJECTIONS
        in_first = (p == hidden) == reads_hidden  # the slice's first dim is its input side
        return in_first
    raise ShapeMismatch(
        f"{name} {tuple(shape)}: cannot tell whether its experts are stored (in, out) or (out, in); "
        "keep the model's config.json (its architectures name the model class) beside the checkpoint"
    )


def expert_lora(weight: LoraWeight, param: FusedParam, expert: int, depth: int) -> ExpertLora:
    """``weight`` (slice layout) as expert ``expert`` of ``param``, written at nesting ``depth``."""
    return ExpertLora(
        weight.a,
        weight.b,
        weight.alpha,
        weight.use_rslora,
        param=param,
        expert=expert,
        depth=depth,
        module=param.name.rpartition(".")[0],
    )


# -- per-expert 2-D names (runtimes that load Mixtral/Qwen-MoE style expert LoRA) ----------------

# models whose fused gate_up_proj interleaves gate and up columns (gate = [..., ::2], up =
# [..., 1::2]: transformers' ``is_concatenated=False``); the others concatenate [gate; up]
INTERLEAVED_CLASSES = ("GptOss", "OpenaiPrivacyFilter")
# the per-expert 2-D modules a fused parameter becomes (Qwen-MoE names: gate_proj, up_proj, down_proj)
SPLIT_NAMES = {"gate_up_proj": ("gate_proj", "up_proj")}


def split_experts(adapter: Adapter, model_class: str | None = None) -> Adapter:
    """The adapter with every fused-expert module as plain per-expert 2-D LoRAs.

    Expert e of ``<block>.experts.<proj>`` becomes ``<block>.experts.<e>.<proj>`` in the (out, in)
    layout of the per-expert ``nn.Linear`` (Mixtral, Qwen-MoE on disk): for a transposed
    parameter (slice (in, out)) ``A = B_sliceᵀ``, ``B = A_sliceᵀ``. A fused ``gate_up_proj`` is
    split into ``gate_proj`` and ``up_proj`` by rows of B (exact: ΔW_gate = s·B[gate rows] @ A,
    the same A and rank for both): rows ``[:I]``/``[I:]`` where gate and up are concatenated,
    ``0::2``/``1::2`` where they are interleaved (:data:`INTERLEAVED_CLASSES`, gpt-oss).

    Args:
        adapter: an adapter read with its base (fused modules are :class:`ExpertLora`).
        model_class: the base model class (config.json ``architectures[0]``); defaults to the
            adapter's ``auto_mapping.base_model_class``. Needed only to split ``gate_up_proj``.

    Raises:
        UnknownFormat: a ``gate_up_proj`` to split whose model class is unknown.
    """
    model_class = model_class or _model_class(adapter.extra_config)
    weights: dict[str, Any] = {}
    for name, weight in adapter.weights.items():
        if isinstance(weight, ExpertLora) and weight.param is not None:
            weights.update(_per_expert(weight, weight.param, model_class))
        else:
            weights[name] = weight
    extra = {k: v for k, v in adapter.extra_config.items() if k != "target_parameters"}
    return replace(adapter, weights=weights, extra_config=extra)


def _model_class(config: Mapping[str, Any]) -> str | None:
    mapping = config.get("auto_mapping")
    name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return name if isinstance(name, str) else None


def _per_expert(weight: ExpertLora, param: FusedParam, model_class: str | None) -> dict[str, LoraWeight]:
    """One expert's LoRA(s) in the per-expert (out, in) layout, by 2-D module name."""
    a, b = (weight.b.T, weight.a.T) if param.transposed else (weight.a, weight.b)  # (r, in), (out, r)
    block, _, leaf = param.name.rpartition(".")
    prefix = f"{block}.{weight.expert}"
    if leaf not in SPLIT_NAMES:
        return {
            f"{prefix}.{leaf}": LoraWeight(a.contiguous(), b.contiguous(), weight.alpha, weight.use_rslora)
        }
    if model_class is None:
        raise UnknownFormat(
            f"{param.name}: splitting gate_up_proj into gate_proj and up_proj needs the model class "
            "(gate and up are interleaved in gpt-oss, concatenated in others); give --base with its config.json"
        )
    half = b.shape[0] // 2
    rows = (slice(0, None, 2), slice(1, None, 2)) if model_class.startswith(INTERLEAVED_CLASSES) else (
        slice(0, half), slice(half, None)
    )  # fmt: skip
    return {
        f"{prefix}.{part}": LoraWeight(a.clone(), b[row].contiguous(), weight.alpha, weight.use_rslora)
        for part, row in zip(SPLIT_NAMES[leaf], rows, strict=True)  # A cloned: files store no shared memory
    }


def keep_layout(adapter: Adapter, sources: Sequence[Adapter]) -> Adapter:
    """``adapter`` (made by an op from ``sources``) with its ``param[e]`` modules as :class:`ExpertLora`
    again, so that it can be written as PEFT ``target_parameters``.

    An op (combine, resize) returns plain LoRAs; the layout, expert index and nesting come from the
    sources' module of the same name. PEFT stores one rank and alpha per fused parameter, so a
    parameter whose experts came out with different ranks or scales is written with the largest
    rank R and alpha = R (scale 1): each expert's scale is folded into B and its factors padded
    with zero rows of A and columns of B, which leaves every ``s·B@A`` exactly as it was.
    """
    layouts = {n: w for source in sources for n, w in source.weights.items() if isinstance(w, ExpertLora)}
    experts = {n: w for n, w in adapter.weights.items() if n in layouts and isinstance(w, LoraWeight)}
    if not experts:
        return adapter
    by_param: dict[str, list[str]] = {}
    for name in experts:
        by_param.setdefault(FUSED_NAME.match(name)["param"], []).append(name)  # type: ignore[index]
    weights = dict(adapter.weights)
    for names in by_param.values():
        same = len({(experts[n].rank, experts[n].alpha, experts[n].use_rslora) for n in names}) == 1
        rank = max(experts[n].rank for n in names)
        for name in names:
            weight, layout = experts[name], layouts[name]
            a, b, alpha, rslora = weight.a, weight.b, weight.alpha, weight.use_rslora
            if not same:  # fold s into B, pad to rank R: s'·B'@A' = 1·[s·B, 0] @ [A; 0] = s·B@A
                a = torch.cat([a, a.new_zeros(rank - weight.rank, a.shape[1])])  # (R, in)
                b = torch.cat(
                    [b * weight.scale, b.new_zeros(b.shape[0], rank - weight.rank)], dim=1
                )  # (out, R)
                alpha, rslora = float(rank), False
            weights[name] = ExpertLora(
                a,
                b,
                alpha,
                rslora,
                param=layout.param,
                expert=layout.expert,
                depth=layout.depth,
                module=layout.module,
            )
    return replace(adapter, weights=weights)
