"""``loratools similarity ADAPTER_1 ADAPTER_2``: load both adapters, measure φ per shared module.

Two steps, so the CLI can size its progress bar between them: :func:`open_similarity` resolves and
loads (refusals happen here, before any work), :meth:`OpenSimilarity.run` runs the pure
:func:`loratools.ops.similarity.adapter_similarity`. :func:`similarity` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratools.progress import Progress, no_progress

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.adapter import Adapter
    from loratools.ops.similarity import SimilarityOptions as MeasureOptions
    from loratools.ops.similarity import SimilarityReport as MeasureReport

__all__ = ["OpenSimilarity", "SimilarityOptions", "SimilarityReport", "open_similarity", "similarity"]


@dataclass(frozen=True)
class SimilarityOptions:
    """What to compare.

    Attributes:
        first, second: the adapters (paths or Hub ids).
        side: ``"right"`` (right singular vectors of A, the paper) or ``"left"`` (of B).
        threshold: cos² above which a direction counts as shared, in [0, 1].
        base: a base model whose tensor names resolve kohya module names (optional).
        measure: the validated options of the pure operation (built here).

    Raises:
        LoratoolsError: a side or threshold out of range.
    """

    first: str
    second: str
    side: str = "right"
    threshold: float = 0.5
    base: str | None = None
    measure: MeasureOptions = field(init=False)

    def __post_init__(self) -> None:
        from loratools.ops.similarity import SimilarityOptions as Measure

        object.__setattr__(self, "measure", Measure(side=self.side, threshold=self.threshold))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SimilarityReport:
    """φ per shared module; ``to_dict()`` is the ``--json`` document (the adapters as given, then φ).

    Attributes:
        adapters: the two adapter arguments, as given.
        descriptions: one line per adapter saying what was loaded.
        result: the pure operation's report.
    """

    adapters: tuple[str, str]
    descriptions: tuple[str, str]
    result: MeasureReport

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters), **self.result.to_dict()}


@dataclass(frozen=True)
class OpenSimilarity:
    """Both adapters loaded; ``total`` is the number of shared modules (the work to do)."""

    options: SimilarityOptions
    adapters: tuple[Adapter, Adapter]

    @property
    def total(self) -> int:
        first, second = self.adapters
        return sum(name in second.weights for name in first.weights)

    def run(self, progress: Progress = no_progress) -> SimilarityReport:
        """φ(i, j) for every shared module (see :func:`loratools.ops.similarity.adapter_similarity`)."""
        from loratools.io.adapter_dir import describe_adapter
        from loratools.ops.similarity import adapter_similarity

        o = self.options
        result = adapter_similarity(*self.adapters, o.measure, progress=progress)
        descriptions = (
            describe_adapter(o.first, self.adapters[0]),
            describe_adapter(o.second, self.adapters[1]),
        )
        return SimilarityReport((o.first, o.second), descriptions, result)


def open_similarity(options: SimilarityOptions) -> OpenSimilarity:
    """Resolve the base (when given) and load both adapters.

    Raises:
        LoratoolsError: a missing or unreadable adapter or base.
    """
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path

    base = open_checkpoint(resolve_path(options.base)) if options.base else None
    base_names = base.names() if base is not None else None
    shapes = {i.name: tuple(i.shape) for i in base.infos()} if base is not None else None  # fused experts
    first = load_adapter(options.first, base_names=base_names, base_shapes=shapes)
    second = load_adapter(options.second, base_names=base_names, base_shapes=shapes)
    return OpenSimilarity(options, (first, second))


def similarity(options: SimilarityOptions, progress: Progress = no_progress) -> SimilarityReport:
    """Open and run in one call (for library use)."""
    return open_similarity(options).run(progress)
