"""Model cards for adapters: a README.md the Hugging Face Hub understands, from an Adapter and facts.

Pure: an :class:`~loratools.adapter.Adapter` and a few facts go in, markdown comes out; nothing here
reads files or talks to the network. The card has

- YAML front matter the Hub indexes: ``base_model``, ``library_name: peft``, ``pipeline_tag`` (from
  the PEFT task type), ``license`` and ``tags`` (always ``lora``, ``loratools``, ``peft``);
- rank, alpha, scale, targets and parameter counts;
- how the adapter was made (``Adapter.provenance``, written by loratools' commands);
- a spectrum summary: per module, the singular values of the update ``ΔW = s·B·A``, computed
  exactly from the factors (:func:`loratools.linalg.factored_svd`, O((d + k)·r²), no dense d×k);
- usage snippets for PEFT and for ``loratools merge``.

The front matter is written by hand (no YAML library needed): every string is double-quoted with
anything outside printable ASCII escaped, so any base model id, license or tag parses back as itself.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.adapter import Adapter
from loratools.io.resolve import HUB_ID
from loratools.ops.spectrum.report import ModuleSpectrum

__all__ = ["PIPELINE_TAGS", "CardFacts", "hub_model_id", "module_spectra", "render_card"]

# PEFT task_type → the Hub's pipeline_tag and the transformers Auto class that loads the base.
PIPELINE_TAGS: dict[str, tuple[str, str]] = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}
BASE_TAGS = ["lora", "loratools", "peft"]
# Sentences for the methods loratools' commands record in provenance["method"].
METHODS: dict[str, str] = {
    "extract": "Extracted from a full fine-tune: truncated SVD of ΔW = W_finetuned − W_base (`loratools extract`).",
    "train": "Trained with loratools' built-in LoRA loop (`loratools train`).",
    "combine": "Combined from several adapters without forming dense updates (`loratools combine`).",
    "resize": "Re-ranked from another adapter by an optimal truncated SVD of s·B·A (`loratools resize`).",
    "convert": "Converted from another adapter format (`loratools convert`).",
}
MAX_SPECTRUM_ROWS = 24  # more modules than this are summarised per target name


@dataclass(frozen=True)
class CardFacts:
    """What the card states beyond the adapter itself.

    Attributes:
        repo_id: where the adapter lives on the Hub (``org/name``), for the usage snippets.
        base_model: the base model's Hub id; None when unknown (the card then says so).
        license: an SPDX-like license id for the front matter (``apache-2.0``, ``mit``, …).
        pipeline_tag: overrides the tag derived from the adapter's task type.
        extra_tags: more front-matter tags.
        measured: more (label, value) rows for the facts table: what the command that made the
            adapter measured (extract: energy kept, relative error).
    """

    repo_id: str | None = None
    base_model: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    extra_tags: Sequence[str] = field(default_factory=tuple)
    measured: Sequence[tuple[str, str]] = field(default_factory=tuple)


def hub_model_id(name: str | None) -> str | None:
    """``org/name`` when ``name`` is a Hub model id (``org/name[@revision]``, the revision
    dropped) that is not also a local path; else None. Only a Hub id may be a card's
    ``base_model``: the Hub links it to a model page and refuses a value that names none."""
    match = HUB_ID.match(name or "")
    if match is None or Path(str(name)).expanduser().exists():
        return None
    return match["repo"]


def module_spectra(adapter: Adapter) -> list[ModuleSpectrum]:
    """Per module, the exact singular values of ``s·B·A`` from a factored SVD (no dense d×k):
    :func:`loratools.ops.spectrum.adapter_spectrum`, the one spectrum ``loratools spectrum`` shows.

    Args:
        adapter: the adapter; factors are upcast to float32.

    Returns:
        One :class:`~loratools.ops.spectrum.ModuleSpectrum` per module, in the adapter's order.
    """
    from loratools.ops.spectrum.adapter import adapter_spectrum

    return adapter_spectrum(adapter).modules


def front_matter(adapter: Adapter, facts: CardFacts) -> dict[str, Any]:
    """The YAML metadata block as a dict (keys the Hub indexes; None values are left out)."""
    pipeline = facts.pipeline_tag or PIPELINE_TAGS.get(adapter.task_type or "", (None, None))[0]
    tags = [*BASE_TAGS, *(t for t in facts.extra_tags if t not in BASE_TAGS)]
    if facts.base_model:
        tags.append(f"base_model:adapter:{facts.base_model}")  # the Hub's adapter-tree tag
    meta = {
        "base_model": facts.base_model,
        "library_name": "peft",
        "license": facts.license,
        "pipeline_tag": pipeline,
        "tags": tags,
    }
    return {key: value for key, value in meta.items() if value is not None}


def _yaml(meta: Mapping[str, Any]) -> str:
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {_scalar(item)}" for item in value)]
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    """A YAML scalar: strings double-quoted with every non-printable-ASCII character escaped."""
    if not isinstance(value, str):
        return json.dumps(value)
    return '"' + "".join(_escape(c) for c in value) + '"'


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if " " <= c <= "~":
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"  # YAML's escapes


def _span(values: Sequence[float | int]) -> str:
    low, high = min(values), max(values)
    return _num(low) if low == high else f"{_num(low)}–{_num(high)}"


def _num(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _facts_table(adapter: Adapter, measured: Sequence[tuple[str, str]] = ()) -> list[str]:
    weights = list(adapter.weights.values())
    lora_params = sum(w.num_parameters for w in weights)
    saved = adapter.num_parameters - lora_params
    rows = [
        ("rank r", _span([w.rank for w in weights]) if weights else "—"),
        ("alpha", _span([w.alpha for w in weights]) if weights else "—"),
        ("scale (alpha/√r, rsLoRA)" if any(getattr(w, "use_rslora", False) for w in weights) else "scale (alpha/r)",
         _span([w.scale for w in weights]) if weights else "—"),
        ("target modules", ", ".join(f"`{t}`" for t in adapter.target_modules) or "—"),
        ("adapted modules", str(len(weights))),
        ("LoRA parameters", f"{lora_params:,}"),
        ("dtype", str(weights[0].dtype).removeprefix("torch.") if weights else "—"),
        ("task type", adapter.task_type or "—"),
    ]  # fmt: skip
    if saved:
        rows.insert(6, ("fully trained parameters (modules_to_save)", f"{saved:,}"))
    rows += measured
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _provenance(provenance: Mapping[str, Any]) -> list[str]:
    if not provenance:
        return [
            "No provenance is recorded in this adapter's metadata: it was not made by loratools, "
            "or its safetensors metadata was stripped."
        ]
    method = str(provenance.get("method", ""))
    sentence = METHODS.get(method, f"Made by `loratools {method}`." if method else "Made by loratools.")
    rows = [f"| `{key}` | {_cell(value)} |" for key, value in provenance.items() if key != "method"]
    return [sentence, "", "| field | value |", "|---|---|", *rows] if rows else [sentence]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > 120:
        text = text[:117] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _rank_for(m: ModuleSpectrum, fraction: float) -> int:
    """Smallest k whose top-k singular values keep ``fraction`` of ``‖ΔW‖²_F`` (the spectrum is
    complete: factored spectra hold every singular value, so the rank always exists)."""
    return m.effective_rank(fraction) or 0


def _spectrum_rows(adapter: Adapter, spectra: Sequence[ModuleSpectrum]) -> list[str]:
    header = [
        "| module | shape | r | σ₁ | σ_r | stable rank | rank for 90% | rank for 99% |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for m in spectra:
        s = m.singular_values.tolist()
        rows.append(
            f"| `{m.name}` | {m.shape[0]}×{m.shape[1]} | {adapter.weights[m.name].rank} | {s[0]:.4g} | "
            f"{s[-1]:.4g} | {m.stable_rank:.2f} | {_rank_for(m, 0.9)} | {_rank_for(m, 0.99)} |"
        )
    return header + rows


def _grouped_rows(adapter: Adapter, spectra: Sequence[ModuleSpectrum]) -> list[str]:
    """One row per target name (``q_proj``, …): medians over its modules."""
    groups: dict[str, list[ModuleSpectrum]] = {}
    for m in spectra:
        groups.setdefault(m.name.rsplit(".", 1)[-1], []).append(m)
    header = [
        "| target | modules | r | median σ₁ | median stable rank | median rank for 90% | median rank for 99% |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for target, ms in sorted(groups.items()):
        rows.append(
            f"| `{target}` | {len(ms)} | {_span([adapter.weights[m.name].rank for m in ms])} | "
            f"{statistics.median(float(m.singular_values[0]) for m in ms):.4g} | "
            f"{statistics.median(m.stable_rank for m in ms):.2f} | "
            f"{_num(statistics.median(_rank_for(m, 0.9) for m in ms))} | "
            f"{_num(statistics.median(_rank_for(m, 0.99) for m in ms))} |"
        )
    return header + rows


def _spectrum(adapter: Adapter, spectra: Sequence[ModuleSpectrum]) -> list[str]:
    if not spectra:
        return ["The adapter has no LoRA modules."]
    intro = (
        "Singular values σ of each module's update ΔW = s·B·A, computed exactly from the factors. "
        "Stable rank is Σσᵢ²/σ₁²; “rank for 90%” is the smallest k whose top-k singular values keep "
        "90% of ‖ΔW‖²_F (a rank below r means the adapter could be resized with little loss)."
    )
    if len(spectra) <= MAX_SPECTRUM_ROWS:
        return [intro, "", *_spectrum_rows(adapter, spectra)]
    note = f"{len(spectra)} modules, summarised per target (`loratools spectrum` lists every module)."
    return [intro, "", note, "", *_grouped_rows(adapter, spectra)]


def _usage(adapter: Adapter, facts: CardFacts) -> list[str]:
    repo = facts.repo_id or "ORG/ADAPTER"
    base = facts.base_model or "BASE_MODEL"
    auto = PIPELINE_TAGS.get(adapter.task_type or "", (None, "AutoModelForCausalLM"))[1]
    return [
        "With PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "```",
        "",
        "Merged into the base weights with loratools (W = W₀ + s·B·A, streamed shard by shard):",
        "",
        "```bash",
        f"loratools merge {base} {repo} -o merged/",
        "```",
    ]


def render_card(adapter: Adapter, facts: CardFacts, spectra: Sequence[ModuleSpectrum] | None = None) -> str:
    """The README.md for ``adapter``: YAML front matter, facts, provenance, spectrum, usage.

    Args:
        adapter: the adapter being published.
        facts: repo id, base model, license and tags.
        spectra: precomputed :func:`module_spectra` (computed here when None).

    Returns:
        Markdown text ending with a newline.

    Example:
        >>> card = render_card(adapter, CardFacts(repo_id="me/my-lora", base_model="org/base", license="mit"))
        >>> card.startswith("---\\nbase_model:")
        True
    """
    spectra = module_spectra(adapter) if spectra is None else spectra
    title = (facts.repo_id or "LoRA adapter").rsplit("/", 1)[-1]
    base = f"[`{facts.base_model}`](https://huggingface.co/{facts.base_model})" if facts.base_model else None
    lines = [
        "---",
        _yaml(front_matter(adapter, facts)),
        "---",
        "",
        f"# {title}",
        "",
        f"A LoRA adapter ([Hu et al., 2021](https://arxiv.org/abs/2106.09685)) for {base or 'an unrecorded base model'}, "
        "in the PEFT format. Each adapted layer computes h = W₀x + s·B·(A·x).",
        "",
        "## Adapter",
        "",
        *_facts_table(adapter, facts.measured),
        "",
        "## How it was made",
        "",
        *_provenance(adapter.provenance),
        "",
        "## Spectrum",
        "",
        *_spectrum(adapter, spectra),
        "",
        "## Usage",
        "",
        *_usage(adapter, facts),
        "",
    ]
    return "\n".join(lines)
