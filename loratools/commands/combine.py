"""``loratools combine ADAPTER... -o OUT``: paths around the pure weighted sum of adapters.

Two steps, so the CLI can size its progress bar between them: :func:`open_combine` resolves, checks
the output and loads (every refusal happens here, before any work), :meth:`OpenCombine.run` runs
:func:`loratools.ops.combine.combine_adapters` and writes the result atomically. :func:`combine`
does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import InvalidOptions, LoratoolsError
from loratools.progress import Progress, no_progress

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.adapter import Adapter
    from loratools.ops.combine import CombineOptions as SumOptions
    from loratools.ops.combine import CombineResult

__all__ = ["CombineOptions", "CombineReport", "OpenCombine", "combine", "open_combine"]


@dataclass(frozen=True)
class CombineOptions:
    """What to combine, where to, and how.

    Attributes:
        adapters: the inputs (paths or Hub ids), in order.
        output: a PEFT folder, or ``NAME.safetensors`` for a kohya file.
        weights, method, rank, energy, density, seed, split, saved_modules: see
            :class:`loratools.ops.combine.CombineOptions` (``weights`` empty or None: all 1).
        base: a base model whose tensor names resolve kohya module names (optional).
        dtype: ``float32``/``bfloat16``/``float16`` for the output; None keeps the inputs'.
        device: where the math runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        force: replace ``output`` if it exists.
        combining: the validated options of the pure operation (built here).

    Raises:
        InvalidOptions: a method and its options that do not fit together, or a weight count
            other than the adapter count.
        LoratoolsError: a CUDA device asked for but not available.
    """

    adapters: tuple[str, ...]
    output: Path
    weights: tuple[float, ...] | None = None
    method: str | None = None
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    seed: int = 0
    split: str = "sqrt"
    saved_modules: str = "auto"
    base: str | None = None
    dtype: str | None = None
    device: str = "auto"
    force: bool = False
    combining: SumOptions = field(init=False)

    def __post_init__(self) -> None:
        import torch

        if self.weights and len(self.weights) != len(self.adapters):
            raise InvalidOptions(
                f"got {len(self.weights)} --weight values for {len(self.adapters)} adapters; give one per adapter"
            )

        from loratools.device import resolve_device
        from loratools.ops.combine import CombineOptions as Sum

        combining = Sum(
            weights=self.weights or None, method=self.method, rank=self.rank, energy=self.energy,  # type: ignore[arg-type]
            density=self.density, seed=self.seed, split=self.split, saved_modules=self.saved_modules,  # type: ignore[arg-type]
            dtype=getattr(torch, self.dtype) if self.dtype else None, device=resolve_device(self.device),
        )  # fmt: skip
        object.__setattr__(self, "combining", combining)


@dataclass(frozen=True)
class CombineReport:
    """What was written; ``to_dict()`` is the ``--json`` document (the output, then the summary).

    Attributes:
        output: the path written.
        descriptions: one line per input saying what was loaded.
        result: the pure operation's result (the combined adapter and its per-module report).
    """

    output: Path
    descriptions: tuple[str, ...]
    result: CombineResult

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), **self.result.summary()}


@dataclass(frozen=True)
class OpenCombine:
    """The inputs loaded and the output checked; ``total`` is the number of output modules."""

    options: CombineOptions
    adapters: tuple[Adapter, ...]

    @property
    def total(self) -> int:
        return len({name for adapter in self.adapters for name in adapter.weights})

    def run(self, progress: Progress = no_progress) -> CombineReport:
        """Combine per module and write the result atomically to ``options.output``."""
        from loratools.io.adapter_dir import describe_adapter, save_adapter_as
        from loratools.kinds.fused import keep_layout
        from loratools.ops.combine import combine_adapters

        o = self.options
        sources = list(o.adapters)
        result = combine_adapters(self.adapters, o.combining, sources=sources, progress=progress)
        save_adapter_as(keep_layout(result.adapter, self.adapters), o.output, force=o.force)
        lines = tuple(describe_adapter(s, a) for s, a in zip(sources, self.adapters, strict=True))
        return CombineReport(o.output, lines, result)


def open_combine(options: CombineOptions) -> OpenCombine:
    """Resolve the inputs, check the output is none of them, load, check the output's form and
    that all inputs name their modules the same way.

    Raises:
        LoratoolsError: a missing input or base, an output overlapping an input, a PEFT output for
            kohya names without ``base``, or kohya names mixed with module paths.
    """
    from loratools.io.adapter_dir import check_output_form, load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.io.writer import check_not_an_input

    paths = [resolve_path(a, what="adapter") for a in options.adapters]
    check_not_an_input(options.output, paths)
    base = open_checkpoint(resolve_path(options.base)) if options.base else None
    base_names = base.names() if base is not None else None
    shapes = {i.name: tuple(i.shape) for i in base.infos()} if base is not None else None  # fused experts
    loaded = tuple(load_adapter(p, base_names=base_names, base_shapes=shapes) for p in paths)
    for adapter in loaded:
        check_output_form(adapter, options.output)
    _check_same_naming(options.adapters, loaded)
    return OpenCombine(options, loaded)


def combine(options: CombineOptions, progress: Progress = no_progress) -> CombineReport:
    """Open and run in one call (for library use)."""
    return open_combine(options).run(progress)


def _check_same_naming(sources: tuple[str, ...], loaded: tuple[Adapter, ...]) -> None:
    """Kohya names (a kohya file read without --base) and module paths never match: adding such
    adapters would silently give their union instead of their sum."""
    from loratools.formats.detect import is_kohya_stem

    kohya = [
        s for s, a in zip(sources, loaded, strict=True) if a.weights and all(map(is_kohya_stem, a.weights))
    ]
    if kohya and len(kohya) < len(sources):
        raise LoratoolsError(
            f"{kohya[0]} has kohya names and other adapters have module paths, so no module would "
            "match; pass --base BASE to resolve the kohya names"
        )
