"""``loratools merge | unmerge | swap``: paths around the pure merge pass (:mod:`loratools.ops.merge`).

Merge, unmerge and swap are one pass with positive, negative or both kinds of weights. Two steps,
so the CLI can size its progress bar between them: :func:`open_merge` checks the argument order,
resolves and opens the base and the adapters (every refusal that needs no plan happens here),
:meth:`OpenMerge.run` plans (every adapter checked against the base before anything is written)
and writes atomically (:mod:`loratools.commands.merge_write`), returning a :class:`MergeReport`
(the output and the pass's :class:`~loratools.ops.merge.MergeResult`) whose ``to_dict()`` is the
``--json`` document. :func:`merge` does both; :func:`merge_paths` and :func:`merge_checkpoint` are
the same for library callers holding an ops :class:`~loratools.ops.merge.MergeOptions` or an open
checkpoint, and return the pass's ``MergeResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import LoratoolsError
from loratools.progress import Progress, no_progress

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.io.checkpoint import Checkpoint
    from loratools.ops.merge import MergeOptions as Merging
    from loratools.ops.merge import MergeResult, MergeTerm
    from loratools.ops.merge.dora import DoraPlan

__all__ = [
    "MergeOptions",
    "MergeReport",
    "OpenMerge",
    "merge",
    "merge_checkpoint",
    "merge_paths",
    "open_merge",
]


@dataclass(frozen=True)
class MergeOptions:
    """What to merge into what, where to, and how.

    Attributes:
        base: the base checkpoint (the merged model, for unmerge/swap): path or Hub id.
        output: a model folder, or ``NAME.safetensors`` for one file (not for a sharded base).
        add: (adapter, weight) pairs to add: ``W += w·s·B·A``.
        remove: (adapter, weight) pairs to subtract: ``W −= w·s·B·A``.
        dtype: ``float32``/``bfloat16``/``float16`` for floating tensors; None keeps each one's.
        device: where the matmuls run: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        keep_quantization, tokenizer: see :class:`loratools.ops.merge.MergeOptions`.
        force: replace ``output`` if it exists.
        merging: the validated options of the pure pass (built here).

    Raises:
        LoratoolsError: no adapter, a non-floating dtype, a CUDA device asked for but absent.
    """

    base: str
    output: Path
    add: tuple[tuple[str, float], ...] = ()
    remove: tuple[tuple[str, float], ...] = ()
    dtype: str | None = None
    device: str = "auto"
    keep_quantization: bool = False
    tokenizer: str | None = None
    force: bool = False
    merging: Merging = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from loratools.device import resolve_device
        from loratools.ops.merge import MergeOptions as Merge

        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "add", tuple((str(a), float(w)) for a, w in self.add))
        object.__setattr__(self, "remove", tuple((str(a), float(w)) for a, w in self.remove))
        merging = Merge(
            dtype=getattr(torch, self.dtype) if self.dtype else None, device=str(resolve_device(self.device)),
            keep_quantization=self.keep_quantization, tokenizer=self.tokenizer,
        )  # fmt: skip
        object.__setattr__(self, "merging", merging)

    @property
    def operation(self) -> str:
        """``merge``, ``unmerge`` or ``swap``, from which adapters are given."""
        return _operation(self.add, self.remove)


@dataclass(frozen=True)
class MergeReport:
    """What was written; ``to_dict()`` is the ``--json`` document (the output, then the pass's record).

    Attributes:
        output: the folder or file written.
        result: the pass's result: operation, adapters, per-tensor precision, warnings.
    """

    output: Path
    result: MergeResult

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), **self.result.to_dict()}


@dataclass(frozen=True)
class OpenMerge:
    """The base opened and every adapter loaded against its names; ``total`` is its tensor count."""

    ckpt: Checkpoint
    terms: list[MergeTerm]
    inputs: list[Path]
    output: Path
    merging: Merging
    operation: str
    base_ids: list[str]
    force: bool

    @property
    def total(self) -> int:
        return len(self.ckpt)

    def run(self, progress: Progress = no_progress) -> MergeReport:
        """Plan (refusing misfits, all listed, before writing) and write the output atomically."""
        result = merge_checkpoint(
            self.ckpt, self.terms, self.output, self.merging, force=self.force, inputs=self.inputs,
            base_ids=self.base_ids, operation=self.operation, progress=progress,
        )  # fmt: skip
        return MergeReport(self.output, result)


def open_merge(options: MergeOptions) -> OpenMerge:
    """Check the argument order, resolve and open the base, load every adapter against it.

    Raises:
        LoratoolsError: no adapter, arguments in the wrong order (an adapter where the base
            goes), a missing input, an adapter that does not load.
    """
    return _open(options.base, options.output, options.add, options.remove, options.merging, options.force)


def merge(options: MergeOptions, progress: Progress = no_progress) -> MergeReport:
    """Open and run in one call (for library use)."""
    return open_merge(options).run(progress)


def merge_paths(
    base: str,
    output: str | Path,
    *,
    add: Sequence[tuple[str, float]] = (),
    remove: Sequence[tuple[str, float]] = (),
    options: Merging | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> MergeResult:
    """:func:`merge` with the pure pass's own options (dtype as a ``torch.dtype``, device resolved).

    Args:
        base: checkpoint path or Hub id (the merged model, for unmerge/swap).
        output: model folder, or ``NAME.safetensors`` for one file (not for a sharded base).
        add: (adapter, weight) pairs to add: ``W += w·s·B·A``.
        remove: (adapter, weight) pairs to subtract: ``W −= w·s·B·A``.
        options: dtype, device, warning threshold.
        force: replace an existing output.
        progress: called once per base tensor.

    Returns:
        the pass's result (:class:`~loratools.ops.merge.MergeResult`).
    """
    from loratools.ops.merge import MergeOptions as Merge

    opened = _open(base, Path(output), tuple(add), tuple(remove), options or Merge(), force)
    return opened.run(progress).result


def _operation(add: Sequence[object], remove: Sequence[object]) -> str:
    return "swap" if add and remove else "merge" if add else "unmerge"


def _open(
    base: str, output: Path, add: Sequence[tuple[str, float]], remove: Sequence[tuple[str, float]],
    merging: Merging, force: bool,
) -> OpenMerge:  # fmt: skip
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.ops.merge import MergeTerm

    if not add and not remove:
        raise LoratoolsError("no adapter given; name at least one adapter to merge or remove")
    operation = _operation(add, remove)
    _check_order(base, [argument for argument, _ in (*add, *remove)], operation)
    ckpt = open_checkpoint(resolve_path(base))
    names = ckpt.names()
    shapes = {info.name: tuple(info.shape) for info in ckpt.infos()}  # fused experts' layout
    terms, paths = [], []
    for sign, pairs in ((1.0, add), (-1.0, remove)):
        for argument, weight in pairs:
            path = resolve_path(argument, what="adapter")
            adapter = load_adapter(path, base_names=names, base_shapes=shapes)
            terms.append(MergeTerm(adapter, sign * weight, str(argument)))
            paths.append(path)
    base_ids = _base_ids(base, ckpt) if operation == "merge" else []
    return OpenMerge(ckpt, terms, paths, output, merging, operation, base_ids, force)


def merge_checkpoint(
    ckpt: Checkpoint,
    terms: Sequence[MergeTerm],
    output: str | Path,
    options: Merging | None = None,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    base_ids: Sequence[str] | None = None,
    operation: str | None = None,
    progress: Progress = no_progress,
) -> MergeResult:
    """Write ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` for every tensor of ``ckpt`` to ``output``, streaming.

    ``output`` is what its name says: ``NAME.safetensors`` is one file (refused for a sharded
    base; a model folder's other files are then left out, with a warning), any other name a model
    folder (the base's shard files, index and metadata, and every non-weight file and sub-folder
    copied; ``model.safetensors`` for a single-file base). It is written atomically after every
    adapter has been checked against the base.

    Args:
        ckpt: the base (or merged) checkpoint.
        terms: adapters with signed weights (negative = remove).
        output: the folder or file to create.
        options: dtype, device, warning threshold.
        force: replace an existing output.
        inputs: adapter paths, which the output must not overlap.
        base_ids: names of the base for the base_model check (see :func:`plan_merge`); default:
            its path when merging, nothing (no check) when removing adapters.
        operation: ``merge``/``unmerge``/``swap`` for the report; default from the weights' signs.
        progress: called once per tensor.

    Returns:
        the pass's result, including the precision record and warnings.

    Raises:
        MissingKeys, ShapeMismatch: adapters that do not fit, all listed, before writing anything.
        OutputExists: ``output`` exists and not ``force`` (or another run created it meanwhile).
        LoratoolsError: an output name that is not a folder or ``.safetensors`` file (see
            :func:`~loratools.io.writer.checkpoint_output_is_file`).
    """
    from loratools.commands.merge_write import write_merged
    from loratools.io.writer import check_not_an_input, checkpoint_output_is_file, model_files
    from loratools.ops.merge import MergeOptions as Merge
    from loratools.ops.merge.plan import plan_merge
    from loratools.ops.merge.precision import build_result
    from loratools.ops.moe import fused_experts, merged_experts

    options = options or Merge()
    output = Path(output)
    check_not_an_input(output, [ckpt.path, ckpt.model_dir, *inputs])
    shards = len(ckpt.files) if ckpt.index_name else None
    gguf_out = options.keep_quantization and ckpt.kind == "gguf"  # a .gguf file, the base's types
    as_file = True if gguf_out else checkpoint_output_is_file(output, source=ckpt.path, shards=shards)
    infos = {info.name: info for info in ckpt.infos()}
    if operation is None:
        signs = {term.weight > 0 for term in terms}
        operation = "swap" if len(signs) == 2 else "merge" if signs == {True} else "unmerge"
    if base_ids is None:
        base_ids = [str(ckpt.path)] if operation == "merge" else []
    plan = plan_merge(infos, terms, base_ids)
    plan.dora = _plan_dora(ckpt, terms, options.keep_quantization)
    if plan.dora is not None:
        plan.dora.check_record(plan.updates, str(_record_of(ckpt)))
    stats, files = write_merged(ckpt, plan, output, options, force=force, progress=progress, as_file=as_file)
    result = build_result(operation, terms, options, plan, stats, files, len(infos))
    fused = fused_experts({name: tuple(info.shape) for name, info in infos.items()})
    result = replace(result, experts=merged_experts(list(infos), plan.updates, fused))
    if plan.dora is not None and plan.dora.output_record().norms:  # the DoRA norms record written
        from loratools.io.dora_record import record_path

        result = replace(result, dora_record=str(record_path(output, not as_file)))
    left = model_files(ckpt.model_dir) if as_file and ckpt.model_dir is not None else []
    if left:  # a model folder merged into one file: say what did not come along
        note = (
            f"{output} is a single weights file, so {ckpt.model_dir}'s other files were not carried "
            f"({', '.join(left)}); write to a folder (-o {output.stem}) to keep them"
        )
        result = replace(result, warnings=[note, *result.warnings])
    return result


def _plan_dora(ckpt: Checkpoint, terms: Sequence[MergeTerm], keep_quantization: bool) -> DoraPlan | None:
    """The DoRA path and the norms record found with the base (see :mod:`loratools.ops.merge.dora`)."""
    from loratools.io.dora_record import read_record_file
    from loratools.ops.merge.dora import DoraRecord, plan_dora

    where = _record_of(ckpt)
    stored = read_record_file(where)
    record = DoraRecord.from_tensors(*stored, str(where)) if stored is not None else None
    plan = plan_dora(terms, record, str(where))
    if plan is not None and keep_quantization:
        raise LoratoolsError(
            "--keep-quantization does not handle DoRA adapters (or a DoRA norms record) yet; merge "
            "into float weights (drop --keep-quantization)"
        )
    return plan


def _record_of(ckpt: Checkpoint) -> Path:
    """Where the DoRA norms record of ``ckpt`` would be (inside its folder, beside a single file)."""
    from loratools.io.dora_record import record_path

    return record_path(ckpt.model_dir, True) if ckpt.model_dir else record_path(ckpt.path, False)


def _base_ids(argument: str, ckpt: Checkpoint) -> list[str]:
    """Names the base goes by, for the adapters' base_model check: the argument, its folder, and
    config.json's ``_name_or_path``."""
    from loratools.io.model_config import read_model_config

    ids = [argument, str(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)]
    name = read_model_config(ckpt.model_dir).get("_name_or_path") if ckpt.model_dir else None
    return ids + ([name] if isinstance(name, str) else [])


def _check_order(base: str, adapters: list[str], command: str) -> None:
    """``merge ADAPTER BASE`` and the like: say which argument is which (see check_argument_order).
    Paths that cannot be read are left to the usual errors, raised when they are opened."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path
    from loratools.ops.merge.plan import check_argument_order

    try:
        first = detect_path(resolve_path(base))
        others = [(a, detect_path(resolve_path(a, what="adapter"))) for a in adapters]
    except LoratoolsError:
        return
    check_argument_order(command, base, first, others)
