"""Singular-value spectra of weight updates: is ΔW really low-rank? (Hu et al., 2021, Sections 4.1, 7)

Two sources of a weight update Δ (out × in) per module:

- an adapter: ``Δ = s·B·A`` whose SVD comes from QR(B), QR(Aᵀ) and an r×r core —
  O((out + in)·r²), never the out×in product (:func:`loratools.linalg.factored_svd`, or
  :func:`factored_singular_values` when the vectors are not needed);
- a full fine-tune: ``ΔW = W_ft − W_base``, streamed one tensor pair at a time, with the top-k
  singular values by randomized SVD and the exact ``‖ΔW‖²_F``, so energy fractions are exact
  even when only the top of the spectrum is computed.

Per module, with σ₁ ≥ σ₂ ≥ … the singular values and ``E = ‖Δ‖²_F = Σ σᵢ²``:

- energy kept at rank r: ``e(r) = Σ_{i≤r} σᵢ² / E`` (the best rank-r approximation keeps exactly
  this, by Eckart–Young);
- effective rank at f: the smallest r with ``e(r) ≥ f`` (None when the computed top of the
  spectrum does not reach f);
- stable rank: ``E / σ₁² = ‖Δ‖²_F / ‖Δ‖²₂``, between 1 and rank(Δ).

With a base model, an adapter's modules also get the paper's amplification factor (Section 7.3):
``‖Δ‖_F / ‖Uᵀ W0 V‖_F`` with U, V the top-r singular vectors of Δ, beside the same ratio for
random orthonormal U, V.

The package re-exports every public name here; the work lives in one module per job:

- :mod:`loratools.ops.spectrum.report`: options, per-module spectra and the report (data only);
- :mod:`loratools.ops.spectrum.adapter`: factored spectra of an adapter;
- :mod:`loratools.ops.spectrum.delta`: streamed spectra of two checkpoints;
- :mod:`loratools.ops.spectrum.amplification_factor`: the amplification factor;
- :mod:`loratools.ops.spectrum.summary`: summaries by module type, by layer and model-wide.
"""

from __future__ import annotations

from loratools.ops.spectrum.adapter import adapter_spectrum, factored_singular_values
from loratools.ops.spectrum.amplification_factor import Amplification, amplification
from loratools.ops.spectrum.delta import delta_spectrum, plan_delta
from loratools.ops.spectrum.report import ModuleSpectrum, SpectrumOptions, SpectrumReport, TensorSource
from loratools.ops.spectrum.summary import ENERGY_LEVELS, group_summary, layer_of, module_type, summarize

__all__ = [
    "ENERGY_LEVELS",
    "Amplification",
    "ModuleSpectrum",
    "SpectrumOptions",
    "SpectrumReport",
    "TensorSource",
    "adapter_spectrum",
    "amplification",
    "delta_spectrum",
    "factored_singular_values",
    "group_summary",
    "layer_of",
    "module_type",
    "plan_delta",
    "summarize",
]
