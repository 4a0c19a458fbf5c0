"""Spectra of a full fine-tune's updates ``ΔW = W_ft − W_base``, streamed one tensor pair at a time.

The top-k singular values come from a randomized SVD and ``‖ΔW‖²_F`` is computed exactly, so
energy fractions are exact even when only the top of the spectrum is known.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch

from loratools import linalg
from loratools.errors import ShapeMismatch, list_problems
from loratools.ops.delta import DeltaBuffer
from loratools.ops.moe import experts_entry
from loratools.ops.spectrum.geometry import module_geometry
from loratools.ops.spectrum.noise import noise_floor
from loratools.ops.spectrum.report import ModuleSpectrum, SpectrumOptions, SpectrumReport, TensorSource
from loratools.progress import Progress, no_progress

__all__ = ["delta_spectrum", "plan_delta"]


def plan_delta(
    base: TensorSource, finetuned: TensorSource, include: str | None = None
) -> tuple[list[str], list[str]]:
    """Which tensors to compare: 2-D tensors in both checkpoints (matching ``include``).

    Returns:
        ``(names, skipped)``: names in the fine-tune's order; tensors found in only one side.

    Raises:
        ShapeMismatch: tensors whose shapes differ between the two, all listed at once.
    """
    pattern = re.compile(include) if include else None
    base_names = set(base.names())
    ft_names = finetuned.names()
    wanted = [n for n in ft_names if pattern is None or pattern.search(n)]
    only_base = {n for n in base_names - set(ft_names) if pattern is None or pattern.search(n)}
    skipped = sorted({n for n in wanted if n not in base_names} | only_base)
    names, problems = [], []
    for name in (n for n in wanted if n in base_names):
        shape_b, shape_f = tuple(base.info(name).shape), tuple(finetuned.info(name).shape)
        if shape_b != shape_f:
            problems.append(f"{name}: base {shape_b} vs fine-tune {shape_f}")
        elif len(shape_f) == 2:
            names.append(name)
    if problems:
        raise ShapeMismatch(
            f"base and fine-tune differ in shape: {list_problems(problems)}; are they the same architecture?"
        )
    return names, skipped


def delta_spectrum(
    base: TensorSource,
    finetuned: TensorSource,
    options: SpectrumOptions | None = None,
    *,
    names: Sequence[str] | None = None,
    progress: Progress = no_progress,
) -> SpectrumReport:
    """Spectra of ``ΔW = W_ft − W_base`` per tensor, streamed one pair at a time.

    Each ΔW is formed once in a reused float32 buffer; ``‖ΔW‖²_F`` is exact; the top-k singular
    values come from a randomized SVD (``options.exact``: a full SVD). When k ≥ min(d, k') the
    full SVD is used and the spectrum is complete. Peak memory: about one tensor pair plus ΔW.

    Args:
        base: the base checkpoint.
        finetuned: the fine-tuned checkpoint.
        options: top, exact, include, seed, device.
        names: tensors to compare (default: :func:`plan_delta`).
        progress: called once per tensor.

    Raises:
        ShapeMismatch: see :func:`plan_delta`.
    """
    options = options or SpectrumOptions()
    skipped: list[str] = []
    if names is None:
        names, skipped = plan_delta(base, finetuned, options.include)
    buffer = DeltaBuffer(0, torch.device(options.device))
    modules, unchanged = [], []
    pairs = zip(base.iter_tensors(names), finetuned.iter_tensors(names), strict=True)
    for (name, w_base), (_, w_ft) in pairs:
        delta, energy = buffer.difference(w_ft, w_base)  # (out, in) float32, ‖ΔW‖²_F
        spectrum = _delta_module(name.removesuffix(".weight"), delta, options, energy)
        if spectrum is None:
            unchanged.append(name)
        else:
            if options.geometry.enabled:
                device = options.device
                geometry = module_geometry(w_base.to(device), w_ft.to(device), options.geometry)
                spectrum = replace(spectrum, geometry=geometry)
            floor = noise_floor(base, finetuned, name, w_ft, spectrum.singular_values, spectrum.energy)
            modules.append(replace(spectrum, noise_floor=floor) if floor is not None else spectrum)
        progress(name)
    method = "exact" if options.exact else "randomized"
    settings = {"method": method, "top": options.top, "seed": options.seed, **options.geometry.settings()}
    experts = experts_entry(base.names(), [f"{m.name}.weight" for m in modules])
    return SpectrumReport("checkpoints", modules, unchanged, skipped, settings, experts=experts)


def _delta_module(
    name: str, delta: torch.Tensor, options: SpectrumOptions, energy: float | None = None
) -> ModuleSpectrum | None:
    """One ΔW's spectrum; None when ΔW is exactly zero. ``energy``: ‖ΔW‖²_F when already known."""
    if energy is None:
        energy = linalg.frobenius(delta) ** 2  # float32 rows summed in float64: no float64 copy of ΔW
    if energy == 0.0:
        return None
    full = options.exact or options.top >= min(delta.shape)
    if full:
        s = torch.linalg.svdvals(delta)
        energy = float(s.double().square().sum())  # the same up to rounding; keeps e(rank) = 1
    else:
        s = linalg.randomized_svd(delta, options.top, seed=options.seed).s
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    return ModuleSpectrum(name, shape, s.double().cpu(), energy, complete=full)
