"""The public entry points: :func:`merge_checkpoint` on an open checkpoint and adapters, and
:func:`merge_paths`, which opens them from paths or Hub ids first. Merge, unmerge and swap are
the same pass with positive, negative or both kinds of weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from loratools.errors import LoratoolsError
from loratools.io.checkpoint import Checkpoint
from loratools.io.dora_record import read_record_file, record_path
from loratools.io.writer import check_not_an_input, checkpoint_output_is_file, model_files
from loratools.ops.merge.dora import DoraPlan, DoraRecord, plan_dora
from loratools.ops.merge.plan import check_argument_order, plan_merge
from loratools.ops.merge.precision import MergeReport, build_report
from loratools.ops.merge.stream import write_merged
from loratools.ops.merge.terms import MergeOptions, MergeTerm
from loratools.ops.moe import fused_experts, merged_experts
from loratools.progress import Progress, no_progress


def merge_checkpoint(
    ckpt: Checkpoint,
    terms: Sequence[MergeTerm],
    output: str | Path,
    options: MergeOptions | None = None,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    base_ids: Sequence[str] | None = None,
    operation: str | None = None,
    progress: Progress = no_progress,
) -> MergeReport:
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
        the report, including the precision record and warnings.

    Raises:
        MissingKeys, ShapeMismatch: adapters that do not fit, all listed, before writing anything.
        OutputExists: ``output`` exists and not ``force`` (or another run created it meanwhile).
        LoratoolsError: an output name that is not a folder or ``.safetensors`` file (see
            :func:`~loratools.io.writer.checkpoint_output_is_file`).
    """
    options = options or MergeOptions()
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
    report = build_report(output, operation, terms, options, plan, stats, files, len(infos))
    fused = fused_experts({name: tuple(info.shape) for name, info in infos.items()})
    report = replace(report, experts=merged_experts(list(infos), plan.updates, fused))
    if plan.dora is not None and plan.dora.output_record().norms:  # the DoRA norms record written
        report = replace(report, dora_record=str(record_path(output, not as_file)))
    left = model_files(ckpt.model_dir) if as_file and ckpt.model_dir is not None else []
    if left:  # a model folder merged into one file: say what did not come along
        note = (
            f"{output} is a single weights file, so {ckpt.model_dir}'s other files were not carried "
            f"({', '.join(left)}); write to a folder (-o {output.stem}) to keep them"
        )
        report = replace(report, warnings=[note, *report.warnings])
    return report


def _plan_dora(ckpt: Checkpoint, terms: Sequence[MergeTerm], keep_quantization: bool) -> DoraPlan | None:
    """The DoRA path and the norms record found with the base (see :mod:`.dora`)."""
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
    return record_path(ckpt.model_dir, True) if ckpt.model_dir else record_path(ckpt.path, False)


def _base_ids(argument: str, ckpt: Checkpoint) -> list[str]:
    ids = [argument, str(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)]
    config = ckpt.model_dir / "config.json" if ckpt.model_dir else None
    if config is not None and config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (ValueError, AttributeError):
            name = None
        ids += [name] if isinstance(name, str) else []
    return ids


def _check_order(base: str, adapters: list[str], command: str) -> None:
    """``merge ADAPTER BASE`` and the like: say which argument is which (see check_argument_order).
    Paths that cannot be read are left to the usual errors, raised when they are opened."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    try:
        first = detect_path(resolve_path(base))
        others = [(a, detect_path(resolve_path(a, what="adapter"))) for a in adapters]
    except LoratoolsError:
        return
    check_argument_order(command, base, first, others)


def merge_paths(
    base: str,
    output: str | Path,
    *,
    add: Sequence[tuple[str, float]] = (),
    remove: Sequence[tuple[str, float]] = (),
    options: MergeOptions | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> MergeReport:
    """Open the base and the adapters named by path or Hub id, then :func:`merge_checkpoint`.

    Args:
        base: checkpoint path or Hub id (the merged model, for unmerge/swap).
        output: model folder, or ``NAME.safetensors`` for one file (not for a sharded base).
        add: (adapter, weight) pairs to add: ``W += w·s·B·A``.
        remove: (adapter, weight) pairs to subtract: ``W −= w·s·B·A``.
        options: dtype, device, warning threshold.
        force: replace an existing output.
        progress: called once per base tensor.

    Returns:
        the report.
    """
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path

    if not add and not remove:
        raise LoratoolsError("no adapter given; name at least one adapter to merge or remove")
    _check_order(
        base,
        [argument for argument, _ in (*add, *remove)],
        "swap" if add and remove else "merge" if add else "unmerge",
    )
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
    operation = "swap" if add and remove else "merge" if add else "unmerge"
    return merge_checkpoint(
        ckpt,
        terms,
        output,
        options,
        force=force,
        inputs=paths,
        base_ids=_base_ids(base, ckpt) if operation == "merge" else [],
        operation=operation,
        progress=progress,
    )
