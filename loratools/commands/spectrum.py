"""``loratools spectrum ADAPTER [--base BASE]`` / ``loratools spectrum BASE FINETUNED``: paths
around the pure spectra.

Two steps, so the CLI can size its progress bar between them: :func:`open_spectrum` resolves,
checks and opens the inputs (every refusal happens here, before any work), :meth:`OpenSpectrum.run`
runs :func:`~loratools.ops.spectrum.adapter_spectrum` (or ``dora_spectrum`` for DoRA modules, or
``delta_spectrum`` for a pair of checkpoints). :func:`spectrum` does both. Drawing ``--plot`` stays
in the CLI: the figures are a rendering of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, UnknownFormat
from loratools.io.checkpoint import Checkpoint
from loratools.ops.spectrum import SpectrumOptions as Measure
from loratools.ops.spectrum import SpectrumReport as MeasureReport
from loratools.ops.spectrum.geometry import GeometryOptions
from loratools.progress import Progress, no_progress

__all__ = ["OpenSpectrum", "SpectrumOptions", "SpectrumReport", "check_pair", "open_spectrum", "spectrum"]


@dataclass(frozen=True)
class SpectrumOptions:
    """What to measure.

    Attributes:
        paths: ``(ADAPTER,)`` or ``(BASE, FINETUNED)`` (paths or Hub ids).
        base: with one adapter, its base model (adds amplification; resolves kohya names).
        top, exact, include: see :class:`loratools.ops.spectrum.SpectrumOptions`.
        geometry, intruders, intruder_k, intruder_epsilon: see
            :class:`loratools.ops.spectrum.geometry.GeometryOptions`.
        device: where the math runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        measure: the validated options of the pure operation (built here).

    Raises:
        LoratoolsError: not one or two inputs, ``base`` with two, an option out of range, or a
            CUDA device asked for but not available.
    """

    paths: tuple[str, ...]
    base: str | None = None
    top: int = Measure.top
    exact: bool = Measure.exact
    include: str | None = Measure.include
    geometry: bool = GeometryOptions.geometry
    intruders: bool = GeometryOptions.intruders
    intruder_k: int = GeometryOptions.k
    intruder_epsilon: float = GeometryOptions.epsilon
    device: str = "auto"
    measure: Measure = field(init=False)

    def __post_init__(self) -> None:
        from loratools.device import resolve_device

        if len(self.paths) not in (1, 2):
            raise LoratoolsError(f"expected ADAPTER or BASE FINETUNED, got {len(self.paths)} arguments")
        if self.base and len(self.paths) == 2:
            raise LoratoolsError("--base goes with the ADAPTER form; BASE FINETUNED already names the base")
        measures = GeometryOptions(
            geometry=self.geometry, intruders=self.intruders, k=self.intruder_k, epsilon=self.intruder_epsilon
        )
        measure = Measure(
            top=self.top, exact=self.exact, include=self.include, device=resolve_device(self.device), geometry=measures
        )  # fmt: skip
        object.__setattr__(self, "measure", measure)


@dataclass(frozen=True)
class SpectrumReport:
    """Spectra per module; ``to_dict()`` is the ``--json`` document.

    Attributes:
        inputs: the path arguments, as given.
        kinds: what each input is, in the detector's words ("a PEFT LoRA adapter").
        base: the ``--base`` argument, or None.
        result: the pure operation's report.
    """

    inputs: tuple[str, ...]
    kinds: tuple[str, ...]
    base: str | None
    result: MeasureReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs),
            "kinds": list(self.kinds),
            "base": self.base,
            **self.result.to_dict(),
        }


@dataclass(frozen=True)
class OpenSpectrum:
    """The inputs opened: an adapter (and its base, if any), or a base and a fine-tune.

    ``total`` is the number of modules (tensors, for a pair) whose spectrum is computed.
    """

    options: SpectrumOptions
    base: Checkpoint | None
    adapter: Adapter | None = None
    tuned: Checkpoint | None = None
    names: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.adapter.weights) if self.adapter is not None else len(self.names)

    def run(self, progress: Progress = no_progress) -> SpectrumReport:
        """The spectra: Δ = s·B·A per adapter module (W' − W0 for DoRA), or ΔW per tensor pair."""
        from loratools.ops.dora import dora_modules
        from loratools.ops.spectrum import adapter_spectrum, delta_spectrum
        from loratools.ops.spectrum.dora import dora_spectrum

        o = self.options
        if self.adapter is None:
            assert self.base is not None and self.tuned is not None  # open_spectrum opened both
            result = delta_spectrum(self.base, self.tuned, o.measure, progress=progress)
        elif dora_modules(self.adapter):  # W' − W0 depends on the base: the effective update's spectrum
            result = dora_spectrum(self.adapter, self.base, o.measure, progress=progress)
        else:
            result = adapter_spectrum(self.adapter, o.measure, base=self.base, progress=progress)
        return SpectrumReport(o.paths, _kinds(o.paths), o.base, result)


def open_spectrum(options: SpectrumOptions) -> OpenSpectrum:
    """Open the inputs: the adapter (refusing a model checkpoint, with the two-argument form) and
    its base, or two model checkpoints (refusing an adapter among them, with the call to use).

    Raises:
        LoratoolsError: a missing input, or an input of the wrong kind.
    """
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.resolve import resolve_path
    from loratools.ops.spectrum import plan_delta

    if len(options.paths) == 1:
        base = open_checkpoint(resolve_path(options.base)) if options.base else None
        names = base.names() if base is not None else None  # kohya needs the names
        shapes = {i.name: tuple(i.shape) for i in base.infos()} if base is not None else None  # fused experts
        return OpenSpectrum(options, base, adapter=_load_adapter(options.paths[0], names, shapes))
    base_path, tuned_path = options.paths
    check_pair(base_path, tuned_path)
    base, tuned = open_checkpoint(resolve_path(base_path)), open_checkpoint(resolve_path(tuned_path))
    names, _ = plan_delta(base, tuned, options.measure.include)
    return OpenSpectrum(options, base, tuned=tuned, names=tuple(names))


def spectrum(options: SpectrumOptions, progress: Progress = no_progress) -> SpectrumReport:
    """Open and run in one call (for library use)."""
    return open_spectrum(options).run(progress)


def _load_adapter(
    path: str, base_names: list[str] | None = None, base_shapes: dict[str, tuple[int, ...]] | None = None
) -> Adapter:
    """The adapter at ``path``; a model checkpoint there gets an error that names the two-argument form."""
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    kind = detect_path(resolve_path(path, what="adapter"))
    if kind.kind == "checkpoint":
        raise UnknownFormat(
            f"{path}: {kind.label}, not an adapter; for a full fine-tune's ΔW pass both: "
            "loratools spectrum BASE FINETUNED"
        )
    return load_adapter(path, base_names=base_names, base_shapes=base_shapes)


def _kinds(paths: tuple[str, ...]) -> tuple[str, ...]:
    """What each input is, in the detector's words ("a kohya LoRA adapter")."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    return tuple(detect_path(resolve_path(p)).label for p in paths)


def check_pair(base_path: str, tuned_path: str) -> None:
    """BASE FINETUNED must both be model checkpoints; an adapter among them is named, with the
    call that does what the user meant."""
    from loratools.io.filekind import detect_path
    from loratools.io.resolve import resolve_path

    kinds = [detect_path(resolve_path(p)) for p in (base_path, tuned_path)]
    adapters = [(p, k) for p, k in zip((base_path, tuned_path), kinds, strict=True) if k.kind == "adapter"]
    if not adapters:
        return
    said = "; ".join(f"{p} is {k.label}" for p, k in zip((base_path, tuned_path), kinds, strict=True))
    adapter = adapters[0][0]
    others = [p for p in (base_path, tuned_path) if p != adapter]
    fix = f"loratools spectrum {adapter}" + (f" --base {others[0]}" if len(adapters) == 1 else "")
    raise LoratoolsError(
        f"spectrum BASE FINETUNED takes two model checkpoints, but {said}; for an adapter's "
        f"spectrum run: {fix}"
    )
