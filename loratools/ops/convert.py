"""Conversions: adapters between PEFT, kohya and llama.cpp GGUF; models from .bin/.pt/GGUF to safetensors.

The key tables and the scale folding are pure functions in :mod:`loratools.formats.kohya` and
:mod:`loratools.formats.gguf`; this module only wires readers to writers, one tensor at a time
for models, and reports what it did. Every output is written atomically and inputs are never
touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError
from loratools.formats import gguf as gguf_names
from loratools.formats import kohya
from loratools.io.safetensors_file import TensorSpec
from loratools.kinds import embedding
from loratools.kinds.fused import FUSED_NAME, split_experts
from loratools.progress import Progress, no_progress

if TYPE_CHECKING:
    from loratools.io.checkpoint import ShardLayout

__all__ = ["ADAPTER_TARGETS", "Conversion", "ConvertOptions", "convert", "parse_size", "prepare"]

ADAPTER_TARGETS = ("peft", "kohya", "gguf")
TARGETS = (*ADAPTER_TARGETS, "safetensors")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}  # fmt: skip
SIZE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?I?B?)?\s*$", re.IGNORECASE)
DEFAULT_SHARD = "5GB"


def parse_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"500MiB"`` → 500·2²⁰, ``"1000"`` → 1000.

    Raises:
        LoratoolsError: not a size.
    """
    match = SIZE.match(text)
    if not match:
        raise LoratoolsError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (match["unit"] or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(float(match["n"]) * (1024 if "I" in unit else 1000) ** power)


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
    output: str
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
        if self.to == "kohya" and not self.output.endswith(".safetensors"):
            raise LoratoolsError(
                f"-o {self.output}: a kohya adapter is one .safetensors file; name it *.safetensors"
            )
        if self.to == "gguf" and not self.output.endswith(".gguf"):
            raise LoratoolsError(f"-o {self.output}: a llama.cpp adapter is one .gguf file; name it *.gguf")
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None


@dataclass(frozen=True)
class Conversion:
    """A conversion whose inputs are open and checked: ``total`` units of work, then :meth:`run`.

    Attributes:
        total: modules (adapters) or tensors (models) that ``run`` will report progress for.
        run: writes the output and returns the JSON-able report.
    """

    total: int
    run: Callable[[Progress], dict[str, Any]]


def prepare(options: ConvertOptions) -> Conversion:
    """Open and check the inputs (every input error is raised here, before any output exists)."""
    from loratools.errors import OutputExists
    from loratools.io.writer import check_not_an_input

    check_not_an_input(
        Path(options.output), [Path(options.source), Path(options.base) if options.base else None]
    )
    if Path(options.output).exists() and not options.force:  # fail before reading anything big
        raise OutputExists(f"{options.output} already exists; pass --force to replace it")
    if options.to == "safetensors":
        return _prepare_model(options)
    return _prepare_adapter(options)


def convert(options: ConvertOptions, progress: Progress = no_progress) -> dict[str, Any]:
    """Run one conversion; returns a JSON-able report (``output``, ``from``, ``to``, …)."""
    return prepare(options).run(progress)


# -- DoRA → plain LoRA (-r R | --energy F, with --base) ------------------------------------------------
def _check_bake_rule(options: ConvertOptions) -> None:
    if sum(rule is not None for rule in (options.rank, options.energy, options.budget)) > 1:
        raise LoratoolsError("-r, --energy and --budget: give one rank rule")
    if options.budget is not None and options.budget < 1:
        raise LoratoolsError(f"--budget {options.budget}: must be at least 1")
    if options.rank is not None and options.rank < 1:
        raise LoratoolsError(f"-r {options.rank}: the rank must be at least 1")
    if options.energy is not None and not 0.0 < options.energy <= 1.0:
        raise LoratoolsError(f"--energy {options.energy}: must be in (0, 1]")


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
    from loratools.io.resolve import resolve_path

    if base is None:
        return None
    path = resolve_path(base)
    if path.suffix == ".gguf":
        from loratools.io.gguf_io import GgufModel

        model = GgufModel(path)
        return BaseModel(base, {s.name: s.shape for s in model.specs()}, model.config)
    ckpt = open_checkpoint(path)
    config_file = ckpt.model_dir / "config.json" if ckpt.model_dir is not None else None
    config = json.loads(config_file.read_text()) if config_file and config_file.is_file() else None
    return BaseModel(base, {i.name: tuple(i.shape) for i in ckpt.infos()}, config)


def _record(adapter: Adapter, source_format: str, target: str) -> Adapter:
    """Append this conversion to the adapter's provenance, keeping how it was first made."""
    history = [*adapter.provenance.get("conversions", []), {"from": source_format, "to": target}]
    return adapter.with_weights(adapter.weights, conversions=history)


def _prepare_adapter(options: ConvertOptions) -> Conversion:
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
        report: dict[str, Any] = {"output": options.output, "from": fmt, "to": options.to, **write()}
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

    return Conversion(len(adapter.weights), run)


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
        tensors, metadata = kohya.from_adapter(adapter, options.prefix)
        return lambda: _write_kohya(tensors, metadata, options)
    return _gguf_writer(adapter, base, options)


def _write_kohya(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], options: ConvertOptions
) -> dict[str, Any]:
    from loratools.io.safetensors_file import SafetensorsWriter
    from loratools.io.writer import atomic_output

    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with atomic_output(options.output, force=options.force) as path:
        writer = SafetensorsWriter(path, specs, metadata)
        try:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        except BaseException:
            writer.abort()  # atomic_output removes the partial file
            raise
        writer.close()
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
def _prepare_model(options: ConvertOptions) -> Conversion:
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path

    source = resolve_path(options.source)
    dtype = options.torch_dtype
    if source.suffix == ".gguf":
        from loratools.io.gguf_io import GgufModel

        model = GgufModel(source, dtype)
        specs = model.specs()
        tensors = model.iter_tensors()
        files = model.model_files()
        report: dict[str, Any] = {"from": "gguf", "skipped": model.skipped, "notes": model.notes}
        report["config"] = model.config
        copy_from = None
    else:
        ckpt = open_checkpoint(source)
        specs = [_cast_spec(i, dtype) for i in ckpt.infos()]
        tensors = _cast(ckpt.iter_tensors(), dtype)
        files, copy_from = {}, ckpt.model_dir
        report = {"from": ckpt.kind}

    layout, as_file = _model_layout(options, specs, copy_from, files, report)

    def run(progress: Progress) -> dict[str, Any]:
        out = _write_model(options, layout, as_file, tensors, files, copy_from, progress)
        files_out = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        return {"output": str(out), "to": "safetensors", **report, "tensors": len(specs), "files": files_out}

    return Conversion(len(specs), run)


def _cast_spec(info: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
    return TensorSpec(info.name, tuple(info.shape), cast)


def _cast(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _model_layout(
    options: ConvertOptions,
    specs: list[TensorSpec],
    copy_from: Path | None,
    files: dict[str, str],
    report: dict[str, Any],
) -> tuple[list[ShardLayout], bool]:
    """The output shards, and whether the output is the single file ``NAME.safetensors`` (then
    the model's other files cannot come along: a note says which). Refuses a sharded model named
    ``.safetensors``."""
    from loratools.io.writer import checkpoint_output_is_file, model_files, plan_shards

    layout = plan_shards(specs, parse_size(options.max_shard_size or DEFAULT_SHARD))
    shards = len(layout) if len(layout) > 1 else None
    if not checkpoint_output_is_file(options.output, source=options.source, shards=shards):
        return layout, False
    left = (model_files(copy_from) if copy_from is not None else []) + sorted(files)
    if left:
        report["notes"] = [
            *report.get("notes", []),
            f"{options.output} is a single weights file: {', '.join(left)} not written "
            f"(convert to a folder, -o {Path(options.output).stem}, to keep them)",
        ]
    return layout, True


def _write_model(
    options: ConvertOptions,
    layout: list[ShardLayout],
    as_file: bool,
    tensors: Iterator[tuple[str, torch.Tensor]],
    files: dict[str, str],
    copy_from: Path | None,
    progress: Progress,
) -> Path:
    """Stream ``tensors`` into HF-style safetensors shards under ``options.output`` (or into the
    single file ``options.output`` when ``as_file``), atomically."""
    from loratools.io.writer import CheckpointWriter, atomic_output, copy_model_files

    with atomic_output(options.output, force=options.force) as path:
        folder, shards = (
            (path.parent, [replace(layout[0], filename=path.name)]) if as_file else (path, layout)
        )
        with CheckpointWriter(folder, shards, {"format": "pt"}) as writer:
            for name, tensor in tensors:
                writer.write(name, tensor)
                progress(name)
        if not as_file:
            if copy_from is not None:
                copy_model_files(copy_from, path)
            for name, text in files.items():
                (path / name).write_text(text)
    return Path(options.output)
