"""Spectra of a DoRA adapter's effective updates ``ΔW = W' − W0``, which need the base.

A DoRA module's ``s·B·A`` is only the change of direction; what the model sees is
``W' = diag(m / ‖W0 + s·B·A‖_row) · (W0 + s·B·A)`` (:mod:`loratools.ops.dora`), so its update
``ΔW = W' − W0`` is full-rank in general. Each module's ΔW is formed from one base tensor at a
time and analysed like a fine-tune's (top-k by randomized SVD, exact ‖ΔW‖²_F: see
:mod:`loratools.ops.spectrum.delta`). The report's settings also carry the magnitude change per
module: statistics of ``m / ‖W0‖_row − 1``, how much DoRA rescales each output feature.
"""

from __future__ import annotations

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError
from loratools.formats.names import resolve_modules
from loratools.ops.dora import effective_delta, magnitude_stats
from loratools.ops.spectrum.delta import _delta_module
from loratools.ops.spectrum.report import SpectrumOptions, SpectrumReport, TensorSource
from loratools.progress import Progress, no_progress

__all__ = ["dora_spectrum"]


def dora_spectrum(
    adapter: Adapter,
    base: TensorSource | None,
    options: SpectrumOptions | None = None,
    *,
    progress: Progress = no_progress,
) -> SpectrumReport:
    """Spectrum of every module's effective update ``W' − W0``, streaming the base.

    Args:
        adapter: a DoRA adapter (plain modules in it are analysed the same way).
        base: the adapter's base model.
        options: top-k / exact, seed, device.
        progress: called once per module.

    Returns:
        a report with ``source = "dora"``; ``settings["dora_magnitude"]`` lists each module's
        magnitude statistics and its change against ``‖W0‖_row``.

    Raises:
        LoratoolsError: no base, or the geometry measures (not available for DoRA yet).
    """
    options = options or SpectrumOptions()
    if base is None:
        raise LoratoolsError(
            "a DoRA adapter's update W' − W0 depends on the base weights; pass the base with --base BASE"
        )
    if options.geometry.enabled:
        raise LoratoolsError("--geometry/--intruders are not available for DoRA adapters yet; drop them")
    tensor_of = resolve_modules(adapter.modules, base.names())
    module_of = {tensor: module for module, tensor in tensor_of.items()}
    modules, magnitudes = [], []
    for tensor, w0 in base.iter_tensors(list(module_of)):
        name = module_of[tensor]
        weight = adapter.weights[name]
        if not isinstance(weight, LoraWeight):
            raise LoratoolsError(f"{name}: a {weight.kind} module in a DoRA adapter")
        w0 = w0.to(options.device)
        delta = effective_delta(w0, weight, adapter.fan_in_fan_out)
        delta = delta.T if adapter.fan_in_fan_out else delta  # (out, in)
        spectrum = _delta_module(name, delta, options)
        if spectrum is not None:
            modules.append(spectrum)
        if weight.magnitude is not None:
            magnitudes.append(magnitude_stats(name, weight, w0, adapter.fan_in_fan_out).to_dict())
        del delta, w0
        progress(name)
    method = "exact" if options.exact else "randomized"
    settings = {
        "method": method, "top": options.top, "seed": options.seed,
        "effective_update": "W' - W0 (DoRA)", "dora_magnitude": magnitudes,
    }  # fmt: skip
    return SpectrumReport("dora", modules, settings=settings)
