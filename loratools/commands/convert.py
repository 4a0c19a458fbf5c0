"""``loratools convert SOURCE --to peft|kohya|gguf|safetensors -o OUT``: adapters and models.

Adapters go between PEFT, kohya and llama.cpp GGUF (the key tables and the scale folding are the
pure functions of :mod:`loratools.formats.kohya` and :mod:`loratools.formats.gguf`; DoRA and
LoHa/LoKr become plain LoRA through :mod:`loratools.ops.dora_bake` and
:mod:`loratools.ops.resize`); models go from .bin/.pt/GGUF to safetensors shards
(:mod:`loratools.io.model_copy`). Two steps, so the CLI can size its progress bar between them:
:func:`open_convert` checks the options against the source, resolves and opens it (every refusal
happens here, before any output exists), :meth:`OpenConvert.run` writes atomically and returns the
:class:`ConvertReport`. :func:`convert` does both. Inputs are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError
from loratools.formats import gguf as gguf_names
from loratools.formats import kohya
from loratools.kinds import embedding
from loratools.kinds.fused import FUSED_NAME, split_experts
from loratools.linalg import RankRule
from loratools.progress import Progress, no_progress

if TYPE_CHECKING:
    from loratools.formats.detect import FileKind

__all__ = ["ADAPTER_TARGETS", "ConvertOptions", "ConvertReport", "OpenConvert", "convert", "open_convert"]

ADAPTER_TARGETS = ("peft", "kohya", "gguf")
TARGETS = (*ADAPTER_TARGETS, "safetensors")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}  # fmt: skip


@dataclass(frozen=True)
class ConvertOptions:
    """What ``loratools convert`` does.

    Attributes:
        source: the adapter (PEFT folder/file, kohya file) or model (.bin/.pt, folder, .gguf).
        to: ``peft``, ``kohya``, ``gguf`` (adapters) or ``safetensors`` (models).
        output: the folder (peft, safetensors) or file (kohya, gguf) to create.
        base: the base model: resolves kohya names, and gives llama.cpp its architecture.
        prefix: kohya key prefix (``lora_unet``, ``lora_te``, …).
        dtype: output dtype name (``bf16``, ``float16``, …); None keeps the input's.
        max_shard_size: safetensors shard limit for models, e.g. ``5GB``.
        force: replace an existing output.
        rank, energy: bake a DoRA adapter into a plain LoRA of this rank (or keeping this
            fraction of each module's ‖ΔW‖²_F); needs ``base`` (see ops/dora_bake.py). For LoHa
            and LoKr adapters the same rules (and ``budget``) give their optimal plain LoRA, no
            base needed (:func:`loratools.ops.resize.lycoris_to_lora`).
        budget: LoHa/LoKr → plain LoRA with this total rank over all modules.
        split_experts: write fused-expert LoRA (PEFT ``target_parameters``, read against
            ``base``) as per-expert 2-D modules ``….experts.<e>.<proj>``
            (:func:`loratools.kinds.fused.split_experts`).
    """

    source: str
    to: str
    output: Path
    base: str | None = None
    prefix: str = kohya.DEFAULT_PREFIX
    dtype: str | None = None
    max_shard_size: str | None = None
    force: bool = False
    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    split_experts: bool = False

    def __post_init__(self) -> None:
        from loratools.io.model_copy import parse_size

        object.__setattr__(self, "output", Path(self.output))
        _check_bake_rule(self)
        if self.split_experts and self.base is None:
            raise LoratoolsError(
                "--split-experts reads the fused experts against their base: pass --base BASE"
            )
        if self.to not in TARGETS:
            raise LoratoolsError(f"--to {self.to!r}: choose one of {', '.join(TARGETS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LoratoolsError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.to == "gguf" and self.base is None:
            raise LoratoolsError(
                "--to gguf needs --base BASE (a model folder with config.json, or the GGUF model): "
                "it gives llama.cpp the architecture"
            )
        if self.to == "kohya" and not kohya.PREFIX.match(self.prefix):
            raise LoratoolsError(
                f"--prefix {self.prefix!r}: expected 'lora_' plus letters/digits, e.g. lora_te1"
            )
        if self.to == "kohya" and not str(self.output).endswith(".safetensors"):
            raise LoratoolsError(
                f"-o {self.output}: a kohya adapter is one .safetensors file; name it *.safetensors"
            )
        if self.to == "gguf" and not str(self.output).endswith(".gguf"):
            raise LoratoolsError(f"-o {self.output}: a llama.cpp adapter is one .gguf file; name it *.gguf")
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None


@dataclass(frozen=True)
class ConvertReport:
    """What was written; ``to_dict()`` is the ``--json`` document: ``output``, then ``from``/``to``
    and what the conversion did (per target: kohya prefix, GGUF architecture and alpha, a model's
    tensors and files; modules with their rank, alpha and scale for adapters).

    Attributes:
        output: the path written.
        source_kind: what the source was, in words (``a kohya LoRA adapter``).
        details: the rest of the document, in order.
    """

    output: Path
    source_kind: str
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), **self.details}


@dataclass(frozen=True)
class OpenConvert:
    """A conversion whose inputs are open and checked: ``total`` units of work (modules for
    adapters, tensors for models), then :meth:`run`."""

    options: ConvertOptions
    source_kind: str
    total: int
    write: Callable[[Progress], dict[str, Any]]

    def run(self, progress: Progress = no_progress) -> ConvertReport:
        """Write the output atomically and report."""
        return ConvertReport(self.options.output, self.source_kind, self.write(progress))


def open_convert(options: ConvertOptions) -> OpenConvert:
    """Check the source fits the target, the output is free and no input; open and check the inputs
    (every input error is raised here, before any output exists).

    Raises:
        LoratoolsError: a model with an adapter target or the reverse, a missing input, an output
            that exists (without ``force``) or overlaps an input, an adapter that cannot be
            written as the target.
    """
    from loratools.io.writer import check_not_an_input, check_output_free

    kind = check_source(options.source, options.to)
    check_not_an_input(options.output, [Path(options.source), Path(options.base) if options.base else None])
    check_output_free(options.output, force=options.force)  # fail before reading anything big
    if options.to == "safetensors":
        total, write = _open_model(options)
    else:
        total, write = _open_adapter(options)
    return OpenConvert(options, kind.label, total, write)


def convert(options: ConvertOptions, progress: Progress = no_progress) -> ConvertReport:
    """Open and run in one call (for library use)."""
    return open_convert(options).run(progress)


def check_source(source: str, to: str) -> FileKind:
    """What SOURCE is, refusing a target of the other kind (a model --to peft, an adapter
    --to safetensors) with the call that fits."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    kind = detect_path(resolve_path(source))
    if kind.kind == "adapter" and to == "safetensors":
        raise LoratoolsError(
            f"{source}: {kind.label}; --to safetensors converts models (.bin, .pt, .gguf), for an "
            f"adapter use --to peft, --to kohya or --to gguf"
        )
    if kind.kind == "checkpoint" and to != "safetensors":
        raise LoratoolsError(
            f"{source}: {kind.label}, not an adapter; --to {to} converts adapters, a model converts "
            "with --to safetensors"
        )
    return kind


# -- DoRA → plain LoRA (-r R | --energy F, with --base) ------------------------------------------------
def _check_bake_rule(options: ConvertOptions) -> None:
    """At most one of -r/--energy/--budget, each in range (linalg.RankRule's checks and words)."""
    rule = RankRule(rank=options.rank, energy=options.energy, budget=options.budget)
    rule.check(("rank", "energy", "budget"), required=False)


def _dora_to_lora(adapter: Adapter, options: ConvertOptions) -> tuple[Adapter, list[Any]]:
    """Bake a DoRA adapter into a plain LoRA of its effective updates, streaming the base one
    module at a time; a plain adapter passes unchanged (and refuses a rank rule)."""
    from loratools.ops.dora import dora_modules

    rule = options.rank is not None or options.energy is not None
    if not dora_modules(adapter):
        if rule:
            raise LoratoolsError(
                f"{options.source}: a plain LoRA; -r/--energy bake DoRA adapters only (re-rank a LoRA "
                "with loratools resize)"
            )
        return adapter, []
    if not rule:
        if options.to == "gguf":
            raise LoratoolsError(
                f"{options.source}: a DoRA adapter, which llama.cpp does not run; bake it into a plain "
                "LoRA with -r RANK or --energy F and --base BASE"
            )
        return adapter, []
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.ops.dora_bake import bake_adapter

    if options.base is None:
        raise LoratoolsError(
            "-r/--energy bake a DoRA adapter into a plain LoRA from its base; pass --base BASE"
        )
    ckpt = open_checkpoint(resolve_path(options.base))
    from loratools.formats.names import resolve_modules

    targets = resolve_modules(adapter.modules, ckpt.names())
    base = ((module, ckpt.get(target)) for module, target in targets.items())
    return bake_adapter(adapter, base, rank=options.rank, energy=options.energy)


# -- LoHa / LoKr → plain LoRA (-r R | --energy F | --budget N, no base needed) -----------------------
def _lycoris_to_lora(
    adapter: Adapter, options: ConvertOptions
) -> tuple[Adapter, list[dict[str, Any]] | None]:
    """An adapter with LoHa/LoKr modules as its optimal plain LoRA under the rank rule (exact SVDs
    of each ΔW, see ops/resize.py); (adapter, None) when it has none or no rule was given."""
    from loratools.ops.resize import ResizeOptions, lycoris_to_lora

    lycoris = any(w.kind in ("loha", "lokr") for w in adapter.weights.values())
    if not lycoris and options.budget is not None:
        raise LoratoolsError(
            f"{options.source}: --budget turns LoHa/LoKr into LoRA; re-rank a LoRA with loratools resize --budget"
        )
    if not lycoris or (options.rank is None and options.energy is None and options.budget is None):
        return adapter, None
    rule = ResizeOptions(
        rank=options.rank, energy=options.energy, budget=options.budget, dtype=options.torch_dtype
    )
    converted, modules = lycoris_to_lora(adapter, rule)
    return converted, [m.to_dict() for m in modules]


# -- adapters ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModel:
    """What adapter conversions need from ``--base``: tensor names and shapes, and its config.

    Attributes:
        path: the base as given.
        shapes: tensor name → shape, in storage order.
        config: the Hugging Face config.json contents, if any.
    """

    path: str
    shapes: dict[str, tuple[int, ...]]
    config: dict[str, Any] | None

    def names(self) -> list[str]:
        return list(self.shapes)


def _open_base(base: str | None) -> BaseModel | None:
    """``--base`` as a checkpoint (file, folder, Hub id) or a GGUF model file (names mapped to HF)."""
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.model_config import read_model_config
    from loratools.io.resolve import resolve_path

    if base is None:
        return None
    path = resolve_path(base)
    if path.suffix == ".gguf":
        from loratools.io.gguf_io import GgufModel

        model = GgufModel(path)
        return BaseModel(base, {s.name: s.shape for s in model.specs()}, model.config)
    ckpt = open_checkpoint(path)
    config = read_model_config(ckpt.model_dir) or None if ckpt.model_dir is not None else None
    return BaseModel(base, {i.name: tuple(i.shape) for i in ckpt.infos()}, config)


def _record(adapter: Adapter, source_format: str, target: str) -> Adapter:
    """Append this conversion to the adapter's provenance, keeping how it was first made."""
    history = [*adapter.provenance.get("conversions", []), {"from": source_format, "to": target}]
    return adapter.with_weights(adapter.weights, conversions=history)


def _open_adapter(options: ConvertOptions) -> tuple[int, Callable[[Progress], dict[str, Any]]]:
    from loratools.io.adapter_dir import adapter_format, load_adapter
    from loratools.io.resolve import resolve_path

    source = resolve_path(options.source, what="adapter")
    fmt = adapter_format(source)
    base = _open_base(options.base)
    adapter = load_adapter(
        source,
        base_names=base.names() if base is not None else None,
        base_shapes=base.shapes if base is not None else None,  # fused experts (target_parameters)
    )
    if options.split_experts and base is not None:
        adapter = split_experts(adapter, next(iter((base.config or {}).get("architectures") or []), None))
    adapter, converted = _lycoris_to_lora(adapter, options)
    adapter, baked = _dora_to_lora(adapter, options) if converted is None else (adapter, [])
    if options.dtype:
        adapter = adapter.with_weights({m: w.to(DTYPES[options.dtype]) for m, w in adapter.weights.items()})
    if adapter.base_model is None and options.base is not None:
        adapter = replace(adapter, base_model=options.base)  # kohya files do not name their base
    adapter = _record(adapter, fmt, options.to)
    write = _adapter_writer(adapter, base, options)

    def run(progress: Progress) -> dict[str, Any]:
        report: dict[str, Any] = {"from": fmt, "to": options.to, **write()}
        if converted:
            report["lycoris_converted"] = converted
        if baked:
            report["dora_baked"] = [b.to_dict() for b in baked]
        for module in adapter.weights:
            progress(module)
        report["modules"] = [
            {"name": m, "rank": w.rank, "alpha": w.alpha, "scale": w.scale}
            for m, w in adapter.weights.items()
        ]
        return report

    return len(adapter.weights), run


def _adapter_writer(
    adapter: Adapter, base: BaseModel | None, options: ConvertOptions
) -> Callable[[], dict[str, Any]]:
    """Check that ``adapter`` can be written as ``options.to``; return the function that writes it."""
    if options.to == "peft":
        from loratools.io.adapter_dir import save_adapter

        return lambda: {"path": str(save_adapter(adapter, options.output, force=options.force))}
    fused = [m for m in adapter.weights if FUSED_NAME.match(m)]
    if fused:  # only PEFT's target_parameters holds a fused tensor's experts
        raise LoratoolsError(
            f"--to {options.to} has no form for fused expert tensors ({fused[0]}, …); add --split-experts "
            "to write them as per-expert modules"
        )
    if options.to == "kohya":
        embedding.refuse_embeddings(adapter.weights, "kohya")
        tensors, metadata, _ = kohya.from_adapter(adapter, options.prefix)
        return lambda: _write_kohya(tensors, metadata, options)
    return _gguf_writer(adapter, base, options)


def _write_kohya(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], options: ConvertOptions
) -> dict[str, Any]:
    from loratools.io.writer import write_tensors

    write_tensors(tensors, metadata, options.output, force=options.force)
    return {"prefix": options.prefix, "tensors": len(tensors)}


def _gguf_writer(
    adapter: Adapter, base: BaseModel | None, options: ConvertOptions
) -> Callable[[], dict[str, Any]]:
    from loratools.formats.names import resolve_modules
    from loratools.io.gguf_io import write_adapter_gguf
    from loratools.io.writer import atomic_output

    if base is None or base.config is None:
        where = base.path if base is not None else "(none)"
        raise LoratoolsError(
            f"--base {where}: needs config.json beside the weights (or a GGUF model) for llama.cpp"
        )
    config = base.config
    arch = gguf_names.arch_for(config.get("model_type"))
    base_tensor_of = resolve_modules(adapter.modules, base.names())
    _check_shapes(adapter, base, base_tensor_of)
    n_head, n_kv_head = gguf_names.model_heads(config)
    alpha, tensors = gguf_names.adapter_tensors(
        adapter, base_tensor_of, arch, n_head, n_kv_head, options.torch_dtype
    )

    def write() -> dict[str, Any]:
        with atomic_output(options.output, force=options.force) as path:
            write_adapter_gguf(path, arch.gguf, alpha, tensors, name=Path(options.output).stem)
        return {"architecture": arch.gguf, "alpha": alpha, "tensors": len(tensors)}

    return write


def _check_shapes(adapter: Adapter, base: BaseModel, base_tensor_of: dict[str, str]) -> None:
    from loratools.errors import ShapeMismatch, list_problems

    bad = [
        f"{m} {w.shape} vs {base.shapes[base_tensor_of[m]]}"
        for m, w in adapter.weights.items()
        if tuple(base.shapes[base_tensor_of[m]]) != w.shape
    ]
    if bad:
        raise ShapeMismatch(f"adapter modules do not fit the base: {list_problems(bad)}; wrong --base?")


# -- models ------------------------------------------------------------------------------------------
def _open_model(options: ConvertOptions) -> tuple[int, Callable[[Progress], dict[str, Any]]]:
    from loratools.io.model_copy import open_model_copy, write_model_copy
    from loratools.io.resolve import resolve_path

    source = resolve_path(options.source)
    copy = open_model_copy(
        source, options.output, options.torch_dtype, options.max_shard_size, options.source
    )

    def run(progress: Progress) -> dict[str, Any]:
        out = write_model_copy(copy, options.output, force=options.force, progress=progress)
        files_out = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        return {"to": "safetensors", **copy.facts, "tensors": len(copy.specs), "files": files_out}

    return len(copy.specs), run
