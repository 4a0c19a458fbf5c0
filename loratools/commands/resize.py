"""``loratools resize ADAPTER -o OUT (-r RANK | --energy F | --budget N)``: paths around the pure op.

Two steps, so the CLI can size its progress bar between them: :func:`open_resize` resolves, checks
the output and loads (every refusal happens here, before any work), :meth:`OpenResize.run` runs
:func:`loratools.ops.resize.resize_adapter` and writes the result atomically. :func:`resize` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.progress import Progress, no_progress

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.adapter import Adapter
    from loratools.ops.resize import ResizeOptions as RankOptions
    from loratools.ops.resize import ResizeResult

__all__ = ["OpenResize", "ResizeOptions", "ResizeReport", "open_resize", "resize"]


@dataclass(frozen=True)
class ResizeOptions:
    """What to resize, where to, and how to choose the ranks (exactly one of rank, energy, budget).

    Attributes:
        adapter: the adapter (path or Hub id).
        output: a PEFT folder, or ``NAME.safetensors`` for a kohya file.
        rank, energy, budget, min_rank, split: see :class:`loratools.ops.resize.ResizeOptions`.
        base: a base model whose tensor names resolve kohya module names (optional).
        dtype: ``float32``/``bfloat16``/``float16`` for the new factors; None keeps each module's.
        device: where the SVDs run: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        force: replace ``output`` if it exists.
        ranks: the validated options of the pure operation (built here).

    Raises:
        InvalidOptions: a rank rule missing, doubled or out of range.
        LoratoolsError: a CUDA device asked for but not available.
    """

    adapter: str
    output: Path
    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    min_rank: int = 1
    split: str = "sqrt"
    base: str | None = None
    dtype: str | None = None
    device: str = "auto"
    force: bool = False
    ranks: RankOptions = field(init=False)

    def __post_init__(self) -> None:
        import torch

        from loratools.device import resolve_device
        from loratools.ops.resize import ResizeOptions as Ranks

        ranks = Ranks(
            rank=self.rank, energy=self.energy, budget=self.budget, min_rank=self.min_rank, split=self.split,  # type: ignore[arg-type]
            dtype=getattr(torch, self.dtype) if self.dtype else None, device=resolve_device(self.device),
        )  # fmt: skip
        object.__setattr__(self, "ranks", ranks)


@dataclass(frozen=True)
class ResizeReport:
    """What was written; ``to_dict()`` is the ``--json`` document (the output, then the summary).

    Attributes:
        output: the path written.
        description: one line saying what was loaded.
        result: the pure operation's result (the new adapter and its per-module ranks).
    """

    output: Path
    description: str
    result: ResizeResult

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), **self.result.summary()}


@dataclass(frozen=True)
class OpenResize:
    """The adapter loaded and the output checked; ``total`` is the number of modules."""

    options: ResizeOptions
    path: Path
    adapter: Adapter

    @property
    def total(self) -> int:
        return len(self.adapter.weights)

    def run(self, progress: Progress = no_progress) -> ResizeReport:
        """Resize every module and write the result atomically to ``options.output``."""
        from loratools.io.adapter_dir import describe_adapter, save_adapter_as
        from loratools.kinds.fused import keep_layout
        from loratools.ops.resize import resize_adapter

        o = self.options
        result = resize_adapter(self.adapter, o.ranks, progress=progress)
        save_adapter_as(keep_layout(result.adapter, [self.adapter]), o.output, force=o.force)
        return ResizeReport(o.output, describe_adapter(self.path, self.adapter), result)


def open_resize(options: ResizeOptions) -> OpenResize:
    """Resolve the adapter, check the output is not an input, load, check the output's form.

    Raises:
        LoratoolsError: a missing adapter or base, an output overlapping the input, or a PEFT
            output for kohya names without ``base``.
    """
    from loratools.io.adapter_dir import check_output_form, load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.io.writer import check_not_an_input

    path = resolve_path(options.adapter, what="adapter")
    check_not_an_input(options.output, [path])
    base = open_checkpoint(resolve_path(options.base)) if options.base else None
    base_names = base.names() if base is not None else None
    shapes = {i.name: tuple(i.shape) for i in base.infos()} if base is not None else None  # fused experts
    adapter = load_adapter(path, base_names=base_names, base_shapes=shapes)
    check_output_form(adapter, options.output)
    return OpenResize(options, path, adapter)


def resize(options: ResizeOptions, progress: Progress = no_progress) -> ResizeReport:
    """Open and run in one call (for library use)."""
    return open_resize(options).run(progress)
