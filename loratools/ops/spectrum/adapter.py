"""Exact spectra of an adapter's updates ``Δ = s·B·A`` (Hu et al., 2021, Sections 4.1, 7).

The SVD of each module's Δ (out × in) comes from QR(B), QR(Aᵀ) and an r×r core —
O((out + in)·r²), never the out×in product (:func:`loratools.linalg.factored_svd`, or
:func:`factored_singular_values` when the vectors are not needed). With a base model, each module
also gets its amplification factor (:mod:`loratools.ops.spectrum.amplification_factor`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from loratools import linalg
from loratools.adapter import Adapter, ModuleWeight
from loratools.errors import LoratoolsError, ShapeMismatch, list_problems
from loratools.formats.names import resolve_modules
from loratools.kinds.fused import ExpertLora
from loratools.ops.moe import FUSED, count_experts, fused_experts
from loratools.ops.spectrum.amplification_factor import amplification
from loratools.ops.spectrum.geometry import module_geometry
from loratools.ops.spectrum.report import ModuleSpectrum, SpectrumOptions, SpectrumReport, TensorSource
from loratools.progress import Progress, no_progress

__all__ = ["adapter_spectrum", "factored_singular_values"]


def adapter_spectrum(
    adapter: Adapter,
    options: SpectrumOptions | None = None,
    *,
    base: TensorSource | None = None,
    progress: Progress = no_progress,
) -> SpectrumReport:
    """Exact spectra of every module's ``Δ = s·B·A``, computed in factored form.

    Args:
        adapter: the adapter.
        options: seed and device (``top``/``exact`` do not apply: factored spectra are exact).
        base: the base model; adds each module's amplification factor.
        progress: called once per module.

    Returns:
        A report with complete spectra (r values per module).

    Raises:
        MissingKeys: a module that matches no base tensor.
        ShapeMismatch: a base tensor whose shape is not the module's.
    """
    options = options or SpectrumOptions()
    if options.geometry.enabled and base is None:
        raise LoratoolsError(
            "--geometry and --intruders compare W0 + s·B·A with W0: pass the adapter's base with --base BASE"
        )
    w0s = _base_weights(adapter, base) if base is not None else None
    modules = []
    # only tiny kernels without a base: one thread for the whole loop (toggling costs ~10 ms);
    # with a base, the d×k products of the amplification want every thread
    with _one_thread(options.device if base is None else torch.device("meta")):
        for name, weight in adapter.weights.items():
            modules.append(_adapter_module(name, weight, options, w0s, adapter.fan_in_fan_out))
            progress(name)
    settings = {"method": "factored", "seed": options.seed, "amplification": base is not None}
    settings.update(options.geometry.settings())
    touched = [m if isinstance(w, ExpertLora) else f"{m}.weight" for m, w in adapter.weights.items()]
    experts = _experts(base, touched) if base is not None else None
    return SpectrumReport("adapter", modules, settings=settings, experts=experts)


def _adapter_module(
    name: str,
    weight: ModuleWeight,
    options: SpectrumOptions,
    w0s: Iterator[torch.Tensor] | None,
    fan_in_fan_out: bool,
) -> ModuleSpectrum:
    """One module's factored spectrum, and its amplification when base weights come along."""
    from loratools.kinds.lokr import LokrWeight

    if w0s is None and isinstance(weight, LokrWeight):  # σ(W1 ⊗ W2) = {σᵢ(W1)·σⱼ(W2)}: two small SVDs
        s = weight.singular_values().double().cpu()
        return ModuleSpectrum(name, weight.shape, s, float(s.square().sum()), True, None)
    b, a = (t.to(options.device) for t in weight.scaled_factors())  # (out, r), (r, in)
    if w0s is None:
        s, amp = factored_singular_values(b, a).double().cpu(), None
    else:  # the amplification needs the singular vectors too
        svd = linalg.factored_svd(b, a)
        w0 = next(w0s).to(options.device)
        w0 = w0.T if fan_in_fan_out else w0  # (out, in), the delta's layout
        s, amp = svd.s.double().cpu(), amplification(svd, w0, seed=options.seed)
        if options.geometry.enabled:  # W′ = W0 + s·B·A, one dense (out, in) temporary
            w_ft = torch.addmm(w0.float(), b, a)
            spectrum = ModuleSpectrum(name, weight.shape, s, float(s.square().sum()), True, amp)
            return replace(spectrum, geometry=module_geometry(w0, w_ft, options.geometry))
    return ModuleSpectrum(name, weight.shape, s, float(s.square().sum()), True, amp)


def factored_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` alone: :func:`linalg.factored_svd` without the vectors.

    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ`` with orthonormal Q's, so the σ of B·A are those of the small
    core ``R_b R_aᵀ``. Only the R factors are needed (Householder QR without forming Q) and no
    (d, r) products follow: about 3× fewer flops than the full factored SVD at d = 4096, r = 64.

    Args:
        b: (d, r).
        a: (r, k).

    Returns:
        (min(r, d, k),) descending, in b's float dtype.
    """
    r_b = torch.linalg.qr(b, mode="r").R  # (min(d, r), r)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(k, r), r)
    return torch.linalg.svdvals(r_b @ r_a.T)  # core (min(d, r), min(k, r))


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run tiny CPU kernels on one thread.

    The factored SVD is a few O((d + k)·r²) kernels; with several OpenMP threads their fork/join
    overhead dominates, and on a busy machine each barrier waits for time slices: measured on a
    shared 2-core box, 150 ms per 256×16 module with 2 threads against 0.1 ms with one.
    """
    if device.type != "cpu":  # GPUs, and callers that opt out with the meta device
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _experts(base: TensorSource, touched: list[str]) -> dict[str, Any] | None:
    """The report's expert counts, fused (E, ·, ·) expert tensors included."""
    names = base.names()
    fused = fused_experts({n: tuple(base.info(n).shape) for n in names if FUSED.match(n)})
    count = count_experts(names, touched, fused=fused)
    return count.to_dict() if count is not None else None


def _expert_slices(adapter: Adapter, base: TensorSource) -> Iterator[torch.Tensor]:
    """W0 per module, in module order, when some modules are expert slices ``param[e]`` of fused
    tensors: each fused tensor is read once, while its slices come in a row."""
    held: tuple[str, torch.Tensor] | None = None
    others = [m for m, w in adapter.weights.items() if not isinstance(w, ExpertLora)]
    plain = resolve_modules(others, base.names())
    for module, weight in adapter.weights.items():
        if isinstance(weight, ExpertLora) and weight.param is not None:
            if held is None or held[0] != weight.param.name:
                held = next(iter(base.iter_tensors([weight.param.name])))
            yield held[1][weight.expert]
        else:
            yield next(iter(base.iter_tensors([plain[module]])))[1]


def _base_weights(adapter: Adapter, base: TensorSource) -> Iterator[torch.Tensor]:
    """The base tensors of the adapter's modules, in module order, checked for shape first."""
    if any(isinstance(w, ExpertLora) for w in adapter.weights.values()):
        problems = [
            f"{m}: adapts fused {w.param.name} {w.param.shape}, not in the base"
            for m, w in adapter.weights.items()
            if isinstance(w, ExpertLora) and w.param is not None
            and (w.param.name not in base.names() or tuple(base.info(w.param.name).shape) != w.param.shape)
        ]  # fmt: skip
        if problems:
            raise ShapeMismatch(f"adapter and base do not fit: {list_problems(problems)}")
        return _expert_slices(adapter, base)
    tensor_of = resolve_modules(adapter.modules, base.names())
    problems = []
    for module, tensor in tensor_of.items():
        want = adapter.weights[module].shape
        want = want[::-1] if adapter.fan_in_fan_out else want
        got = tuple(base.info(tensor).shape)
        if got != tuple(want):
            problems.append(f"{module}: adapter {tuple(want)} vs base {tensor} {got}")
    if problems:
        raise ShapeMismatch(
            f"adapter and base do not fit: {list_problems(problems)}; is this the adapter's base model?"
        )
    return (tensor for _, tensor in base.iter_tensors(tensor_of.values()))
