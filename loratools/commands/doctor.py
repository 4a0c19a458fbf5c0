"""``loratools doctor ADAPTER [--base BASE] [--for RUNTIMES]``: gather the facts, run the rules.

Reads the adapter (its kind from the file-kind detector; its modules from the loader, when
loratools can load it) and, with a base, checks every module against it and measures how much of
each update survives a merge in the base's dtype — one base tensor at a time, as merge does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, MissingKeys, UnknownFormat
from loratools.formats.names import resolve_modules
from loratools.io.adapter_dir import load_adapter
from loratools.io.checkpoint import Checkpoint, open_checkpoint
from loratools.io.filekind import detect_path
from loratools.io.model_config import read_model_config, tied_embeddings
from loratools.io.resolve import resolve_path
from loratools.io.safetensors_file import SafetensorsFile
from loratools.kinds import KINDS
from loratools.kinds.fused import ExpertLora
from loratools.ops.doctor import BaseFacts, DoctorReport, adapter_facts, diagnose, parse_runtimes
from loratools.ops.merge.update import apply_update
from loratools.progress import Progress, no_progress

__all__ = ["DoctorOptions", "doctor"]


@dataclass(frozen=True)
class DoctorOptions:
    """What to check.

    Attributes:
        adapter: the adapter (path or Hub id).
        base: the base model to check it against (optional).
        runtimes: comma-separated runtime names, or None for all of them.
        precision: with a base, measure how much of each update a merge in the base's dtype keeps.
    """

    adapter: str
    base: str | None = None
    runtimes: str | None = None
    precision: bool = True
    selected: tuple[str, ...] | None = field(init=False)

    def __post_init__(self) -> None:
        chosen = parse_runtimes(self.runtimes)
        object.__setattr__(self, "selected", None if chosen is None else tuple(chosen))


def doctor(options: DoctorOptions, progress: Progress = no_progress) -> DoctorReport:
    """Diagnose ``options.adapter`` for each runtime in ``options.selected``.

    Raises:
        UnknownFormat: the path is a model, not an adapter.
        CheckpointError: unreadable files.
    """
    path = resolve_path(options.adapter, what="adapter")
    kind = detect_path(path)
    if kind.kind != "adapter":
        raise UnknownFormat(
            f"{options.adapter}: {kind.label}, not an adapter; doctor checks adapters "
            "(pass the model as --base to check an adapter against it)"
        )
    base_path = resolve_path(options.base, what="base model") if options.base else None
    base = open_checkpoint(base_path) if base_path is not None else None
    adapter, error = None, None
    if kind.family != "gguf":  # GGUF adapters are llama.cpp's to load; the header says enough
        try:
            shapes = {i.name: tuple(i.shape) for i in base.infos()} if base is not None else None
            adapter = load_adapter(
                path, base_names=base.names() if base is not None else None, base_shapes=shapes
            )
        except LoratoolsError as exc:
            error = str(exc)
    base_facts = None
    if base is not None and base_path is not None:
        config = read_model_config(base_path)
        base_facts = BaseFacts(str(options.base), tied_embeddings=tied_embeddings(config))
        if adapter is not None:
            base_facts = _base_facts(adapter, base, base_facts, options.precision, progress)
    names = _tensor_names(path) if adapter is None else None
    facts = adapter_facts(
        str(options.adapter), kind.label, kind.family, str(kind.algorithm or "other"), adapter,
        load_error=error, base=base_facts, names=names,
    )  # fmt: skip
    return diagnose(facts, options.selected)


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of an adapter loratools could not load (to tell what it adapts)."""
    weights = path / "adapter_model.safetensors" if path.is_dir() else path
    if weights.suffix != ".safetensors" or not weights.is_file():
        return []
    return list(SafetensorsFile(weights).infos)


def _resolve_each(modules: list[str], names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Module → base tensor for the modules that resolve, and the ones that do not."""
    try:
        return resolve_modules(modules, names), []
    except MissingKeys:
        pass
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for module in modules:
        try:
            resolved.update(resolve_modules([module], names))
        except MissingKeys:
            missing.append(module)
    return resolved, missing


def _base_facts(
    adapter: Adapter, base: Checkpoint, facts: BaseFacts, precision: bool, progress: Progress
) -> BaseFacts:
    """Names, shapes, dtype and (optionally) the merge precision of every module against ``base``."""
    # a fused tensor's experts (read against this base, so they fit it): its dtype, not its precision
    experts = {m: w.param.name for m, w in adapter.weights.items() if isinstance(w, ExpertLora) and w.param}
    tensor_of, missing = _resolve_each([m for m in adapter.modules if m not in experts], base.names())
    mismatched: list[str] = []
    dtypes: Counter[str] = Counter(str(base.info(t).dtype).removeprefix("torch.") for t in experts.values())
    fitting: dict[str, str] = {}
    for module, tensor in tensor_of.items():
        weight = adapter.weights[module]
        want = tuple(weight.weight_shape or weight.shape)
        want = want[::-1] if adapter.fan_in_fan_out else want
        info = base.info(tensor)
        got = tuple(info.shape)
        dtypes[str(info.dtype).removeprefix("torch.")] += 1
        if got != want:
            mismatched.append(f"{module}: adapter {want} vs base {got}")
        else:
            fitting[module] = tensor
    lost = _precision(adapter, base, fitting, progress) if precision else {}
    return BaseFacts(
        facts.path,
        missing=tuple(missing),
        mismatched=tuple(mismatched),
        recorded=adapter.base_model,
        tied_embeddings=facts.tied_embeddings,
        dtype=dtypes.most_common(1)[0][0] if dtypes else None,
        lost=lost,
    )


def _precision(
    adapter: Adapter, base: Checkpoint, tensor_of: dict[str, str], progress: Progress
) -> dict[str, float]:
    """Module → share of its update lost when merged in the base tensor's own dtype (additive kinds)."""
    lost: dict[str, float] = {}
    additive = {
        m: t for m, t in tensor_of.items() if KINDS.get(adapter.weights[m].kind, KINDS["lora"]).additive
    }
    module_of = {t: m for m, t in additive.items()}
    for tensor, w0 in base.iter_tensors(list(additive.values())):
        module = module_of[tensor]
        left, right = adapter.weights[module].scaled_factors()  # (out, w), (w, in·kh·kw)
        if adapter.fan_in_fan_out:
            left, right = right.T, left.T
        w0_2d = w0.reshape(left.shape[0], -1)
        _, stats = apply_update(module, w0_2d, left, right, w0.dtype)
        lost[module] = stats.lost_fraction
        progress(module)
    return lost
