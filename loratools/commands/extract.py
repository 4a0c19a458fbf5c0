"""``loratools extract BASE FINETUNED -o OUT (-r RANK | --energy F | …)``: paths around the pure op.

Two steps, so the CLI can size its progress bar between them: :func:`open_extract` checks the
output, resolves and opens both checkpoints and plans (every refusal happens here, before any
work), :meth:`OpenExtract.run` runs :func:`loratools.ops.extract.extract` (and, with ``dora``,
:func:`loratools.ops.extract.with_dora`), then writes the PEFT folder and its model card
atomically. :func:`extract` does both. Under torchrun every process runs it; only rank 0 writes
and gets a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import InvalidOptions
from loratools.progress import Progress, no_progress

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.io.checkpoint import Checkpoint
    from loratools.ops.extract import ExtractOptions as FactorOptions
    from loratools.ops.extract import ExtractPlan, ExtractResult
    from loratools.ops.extract.dora import DoraExtractReport

__all__ = ["ExtractOptions", "ExtractReport", "OpenExtract", "extract", "open_extract", "target_names"]

FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # names of files, not of folders


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract from, where to, and how (exactly one of rank, energy, sv_threshold, budget).

    Attributes:
        base: the base checkpoint (path or Hub id).
        finetuned: its full fine-tune (path or Hub id).
        output: the PEFT adapter folder to create.
        targets: leaf names (each entry may hold several, comma-separated) or one regex; None or
            empty: every 2-D weight but embeddings and lm_head.
        rank, energy, sv_threshold, budget, max_rank, exact, split, alpha,
            modules_to_save, include_embeddings, embeddings, seed: see
            :class:`loratools.ops.extract.ExtractOptions`.
        dora: a DoRA adapter (magnitude + rank-r direction) instead of plain LoRA.
        dtype: ``float32``/``bfloat16``/``float16`` for the factors; None keeps the fine-tune's.
        device: where the SVDs run: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        force: replace ``output`` if it exists.
        env: torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (the CLI passes ``os.environ``);
            empty for one process.
        factoring: the validated options of the pure operation (built here).

    Raises:
        InvalidOptions: a rank rule missing, doubled or out of range, or any other bad knob.
    """

    base: str
    finetuned: str
    output: Path
    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None
    budget: int | None = None
    max_rank: int | None = None
    targets: tuple[str, ...] | None = None
    exact: bool = False
    split: str = "sqrt"
    alpha: float | None = None
    modules_to_save: bool = False
    include_embeddings: bool = False
    embeddings: str = "skip"
    seed: int = 0
    dora: bool = False
    dtype: str | None = None
    device: str = "auto"
    force: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    factoring: FactorOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from loratools.ops.extract import ExtractOptions as Factor

        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "targets", target_names(self.targets or ()))
        factoring = Factor(
            rank=self.rank, energy=self.energy, sv_threshold=self.sv_threshold, budget=self.budget,
            max_rank=self.max_rank, targets=self.targets, exact=self.exact, split=self.split,  # type: ignore[arg-type]
            alpha=self.alpha, modules_to_save=self.modules_to_save,
            include_embeddings=self.include_embeddings, embeddings=self.embeddings,  # type: ignore[arg-type]
            dtype=getattr(torch, self.dtype) if self.dtype else None, seed=self.seed,
        )  # fmt: skip
        object.__setattr__(self, "factoring", factoring)


@dataclass(frozen=True)
class ExtractReport:
    """What was written; ``to_dict()`` is the ``--json`` document (the output, then the summary,
    then with ``dora`` one DoRA fit per module).

    Attributes:
        output: the folder written.
        result: the pure operation's result (the adapter and what happened to every tensor).
        dora: the DoRA fits, or None for a plain LoRA.
    """

    output: Path
    result: ExtractResult
    dora: tuple[DoraExtractReport, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        document = {"output": str(self.output), **self.result.summary()}
        if self.dora is not None:
            document["dora"] = [r.to_dict() for r in self.dora]
        return document


@dataclass(frozen=True)
class OpenExtract:
    """Both checkpoints opened, the output checked and the tensors planned.

    ``total`` is this process's units of work (its share of the tensors, plus one per LoRA
    module for the DoRA pass rank 0 runs); ``is_main`` says whether it writes (torchrun rank 0).
    """

    options: ExtractOptions
    base: Checkpoint
    finetuned: Checkpoint
    plan: ExtractPlan
    task_type: str | None
    model_class: str | None  # config.json's architectures[0]: the layout of fused expert tensors

    @property
    def is_main(self) -> bool:
        return _place(self.options.env)[0] == 0

    @property
    def total(self) -> int:
        rank, world_size = _place(self.options.env)
        dora = len(self.plan.lora_items) if self.options.dora and rank == 0 else 0
        return len(self.plan.items[rank::world_size]) + dora

    def run(self, progress: Progress = no_progress) -> ExtractReport | None:
        """Extract (sharing the modules among torchrun processes) and, on rank 0, write the PEFT
        folder with its model card atomically. Returns None on the other processes."""
        from loratools.device import resolve_device
        from loratools.distributed import workers_from_env
        from loratools.io.adapter_dir import save_adapter
        from loratools.ops.extract import extract as run_extract
        from loratools.ops.extract import with_dora

        o = self.options
        with workers_from_env(o.env, resolve_device(o.device)) as workers:
            result = run_extract(
                self.base, self.finetuned, o.factoring, plan=self.plan, workers=workers, progress=progress,
                base_model=o.base, finetuned_model=o.finetuned, task_type=self.task_type,
                model_class=self.model_class,
            )  # fmt: skip
        if result is None:  # another torchrun process: rank 0 writes
            return None
        dora = None
        if o.dora:
            result, fits = with_dora(self.base, self.finetuned, result, progress)
            dora = tuple(fits)
        save_adapter(result.adapter, o.output, force=o.force, readme=model_card(result))
        return ExtractReport(o.output, result, dora)


def open_extract(options: ExtractOptions) -> OpenExtract:
    """Check the output, resolve and open both checkpoints, plan from their headers.

    Raises:
        OutputExists: ``output`` exists and ``force`` is False.
        InvalidOptions: ``output`` names a file, not a folder.
        LoratoolsError: a missing input, an output overlapping an input, checkpoints that do not
            pair up (see :func:`loratools.ops.extract.plan_extraction`).
    """
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.model_config import model_class, read_model_config, task_type
    from loratools.io.resolve import resolve_path
    from loratools.io.writer import check_not_an_input, check_output_free
    from loratools.ops.extract import plan_extraction

    output = options.output
    check_output_free(output, force=options.force)
    if output.suffix.lower() in FILE_SUFFIXES:
        raise InvalidOptions(
            f"-o {output}: extract writes a PEFT adapter folder, not a {output.suffix} file; name a folder "
            "(e.g. -o adapter/), then `loratools convert adapter/ --to kohya|gguf` for a single file"
        )
    base_path, ft_path = resolve_path(options.base), resolve_path(options.finetuned)
    check_not_an_input(output, [base_path, ft_path])
    base, finetuned = open_checkpoint(base_path), open_checkpoint(ft_path)
    plan = plan_extraction(base, finetuned, options.factoring)
    if options.dora and any(len(item.shape) == 3 for item in plan.lora_items):
        raise InvalidOptions("--dora: PEFT has no DoRA for fused expert tensors (target_parameters)")
    ft_config = read_model_config(ft_path) if ft_path.is_dir() else {}
    base_config = read_model_config(base_path) if base_path.is_dir() else {}
    kind = task_type(ft_config)
    return OpenExtract(
        options, base, finetuned, plan, kind, model_class(ft_config) or model_class(base_config)
    )


def extract(options: ExtractOptions, progress: Progress = no_progress) -> ExtractReport | None:
    """Open and run in one call (for library use)."""
    return open_extract(options).run(progress)


def model_card(result: ExtractResult) -> str:
    """The adapter's README.md (:func:`loratools.hub.card.render_card`): the base model in the
    front matter only when it is a Hub id, and what the extraction measured."""
    from loratools.hub.card import CardFacts, hub_model_id, render_card

    errors = [m.relative_error for m in result.modules]
    measured = (
        ("energy kept (Σ kept σ² / Σ ‖ΔW‖²)", f"{result.energy_kept:.4f}"),
        ("relative error ‖ΔW − sBA‖/‖ΔW‖", f"mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}"),
    )
    base = hub_model_id(result.adapter.provenance.get("base"))
    return render_card(result.adapter, CardFacts(base_model=base, measured=measured))


def target_names(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--targets q_proj,v_proj --targets o_proj`` → leaf names; a regex is kept whole (it may hold commas)."""
    from loratools.ops.extract import REGEX_CHARS

    if not values:
        return None
    if len(values) == 1 and REGEX_CHARS & set(values[0]):
        return values
    return tuple(name for value in values for name in value.split(","))


def _place(env: Mapping[str, str]) -> tuple[int, int]:
    """(rank, world size) from torchrun's variables, without joining; malformed values count as a
    single process here (joining refuses them with the reason)."""
    try:
        return int(env.get("RANK", "0")), max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1
