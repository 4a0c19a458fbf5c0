"""Model cards (loratools/hub/card.py, and extract's card): front matter that parses, real facts, exact spectra."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraWeight
from loratools.hub.card import CardFacts, front_matter, module_spectra, render_card
from tests.tolerances import TOL


def _front(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match[1])


def _weight(out: int, inp: int, r: int, alpha: float = 16.0, seed: int = 0, **kw) -> LoraWeight:
    g = torch.Generator().manual_seed(seed)
    return LoraWeight(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alpha, **kw)


def _planted(singular_values: list[float]) -> LoraWeight:
    """A module whose update s·B·A has exactly these singular values (alpha = r, so s = 1)."""
    r = len(singular_values)
    u = torch.linalg.qr(torch.randn(24, r, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(20, r, dtype=torch.float64)).Q
    b = (u * torch.tensor(singular_values, dtype=torch.float64)).float()  # (24, r)
    return LoraWeight(v.T.float().contiguous(), b, alpha=float(r))


@pytest.fixture
def adapter() -> Adapter:
    weights = {
        "model.layers.0.self_attn.q_proj": _weight(32, 32, 8, seed=1),
        "model.layers.0.self_attn.v_proj": _weight(16, 32, 4, alpha=8.0, seed=2),
    }
    provenance = {"method": "extract", "base": "org/base", "finetuned": "org/tuned", "rank": 8}
    return Adapter(weights, task_type="CAUSAL_LM", provenance=provenance)


def test_front_matter_parses_with_the_keys_the_hub_reads(adapter):
    card = render_card(adapter, CardFacts(repo_id="me/lora", base_model="org/base", license="apache-2.0"))
    meta = _front(card)
    assert meta == front_matter(
        adapter, CardFacts(repo_id="me/lora", base_model="org/base", license="apache-2.0")
    )
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:3] == ["lora", "loratools", "peft"] and "base_model:adapter:org/base" in meta["tags"]


def test_unknown_facts_are_left_out_not_guessed():
    bare = Adapter({"layer.proj": _weight(8, 8, 2)}, task_type=None)
    meta = _front(render_card(bare, CardFacts()))
    assert set(meta) == {"library_name", "tags"}  # no base_model, license or pipeline_tag
    assert (
        front_matter(bare, CardFacts(pipeline_tag="text-classification"))["pipeline_tag"]
        == "text-classification"
    )


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(base=_text, license=_text, tags=st.lists(_text, max_size=4))
def test_any_strings_round_trip_through_the_yaml(base, license, tags):
    adapter = Adapter({"layer.proj": _weight(4, 4, 1)}, task_type="SEQ_CLS")
    facts = CardFacts(base_model=base, license=license, extra_tags=tags)
    assert _front(render_card(adapter, facts)) == front_matter(adapter, facts)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 40),
    inp=st.integers(1, 40),
    r=st.integers(1, 12),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spectrum_is_the_exact_svd_of_the_scaled_product(out, inp, r, alpha, rslora, seed):
    weight = _weight(out, inp, r, alpha, seed, use_rslora=rslora)
    (spectrum,) = module_spectra(Adapter({"m": weight}))
    reference = torch.linalg.svdvals(weight.delta().double())[: min(r, out, inp)]  # dense, float64
    got = spectrum.singular_values.double()
    scale = float(reference[0]) if float(reference[0]) > 0 else 1.0
    # float32 σ's / σ₁ vs float64 dense svdvals
    torch.testing.assert_close(got / scale, reference / scale, rtol=1e-4, atol=1e-5)
    assert spectrum.shape == (out, inp) and len(spectrum.singular_values) == min(r, out, inp)
    assert bool((spectrum.singular_values[:-1] >= spectrum.singular_values[1:]).all())


def test_spectrum_table_states_planted_energy_ranks():
    # energies 100, 4, 0.01, 0.0001: 90% needs 1 direction (96%), 99% needs 2 (100/104.01 < 0.99)
    adapter = Adapter({"blk.proj": _planted([10.0, 2.0, 0.1, 0.01])})
    card = render_card(adapter, CardFacts())
    row = next(line for line in card.splitlines() if line.startswith("| `blk.proj`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["24×20", "4", "10", "0.01", "1.04", "1", "2"]
    (spectrum,) = module_spectra(adapter)
    torch.testing.assert_close(
        spectrum.singular_values.float(), torch.tensor([10.0, 2.0, 0.1, 0.01]), **TOL[torch.float32]
    )


def test_card_states_the_adapters_real_facts(adapter):
    card = render_card(adapter, CardFacts(repo_id="me/lora", base_model="org/base"))
    assert "| rank r | 4–8 |" in card  # per-module ranks
    assert "| alpha | 8–16 |" in card and "| scale (alpha/r) | 2 |" in card
    assert "| target modules | `q_proj`, `v_proj` |" in card
    params = 8 * (32 + 32) + 4 * (32 + 16)
    assert f"| LoRA parameters | {params:,} |" in card and "| adapted modules | 2 |" in card
    assert "| dtype | float32 |" in card and "| task type | CAUSAL_LM |" in card
    for spectrum in module_spectra(adapter):
        assert f"| `{spectrum.name}` | " in card and f"{float(spectrum.singular_values[0]):.4g}" in card


def test_rslora_and_saved_modules_are_reported():
    weight = _weight(8, 8, 4, alpha=8.0, use_rslora=True).to(torch.bfloat16)
    adapter = Adapter({"m.q": weight}, saved_modules={"lm_head.weight": torch.zeros(10, 8)})
    card = render_card(adapter, CardFacts())
    assert "| scale (alpha/√r, rsLoRA) | 4 |" in card and "| dtype | bfloat16 |" in card
    assert "| fully trained parameters (modules_to_save) | 80 |" in card


def test_provenance_says_how_the_adapter_was_made(adapter):
    card = render_card(adapter, CardFacts())
    section = card.split("## How it was made")[1].split("## Spectrum")[0]
    assert "truncated SVD of ΔW = W_finetuned − W_base" in section
    assert "| `base` | org/base |" in section and "| `rank` | 8 |" in section
    odd = Adapter(adapter.weights, provenance={"method": "frobnicate", "note": "a|b"})
    assert "Made by `loratools frobnicate`." in render_card(odd, CardFacts())
    assert "| `note` | a\\|b |" in render_card(odd, CardFacts())  # cells cannot break the table
    assert "No provenance is recorded" in render_card(Adapter(adapter.weights), CardFacts())


def test_many_modules_are_summarised_per_target():
    weights = {
        f"model.layers.{i}.self_attn.{t}": _weight(8, 8, 2, seed=i)
        for i in range(15)
        for t in ("q_proj", "v_proj")
    }
    card = render_card(Adapter(weights), CardFacts())
    assert "30 modules, summarised per target" in card
    rows = [
        line for line in card.splitlines() if line.startswith("| `q_proj`") or line.startswith("| `v_proj`")
    ]
    assert len(rows) == 2 and all("| 15 | 2 |" in row for row in rows)


def test_usage_snippets_name_the_repo_base_and_auto_class():
    adapter = Adapter({"m.q": _weight(4, 4, 1)}, task_type="SEQ_CLS")
    card = render_card(adapter, CardFacts(repo_id="me/cls-lora", base_model="org/encoder"))
    assert 'AutoModelForSequenceClassification.from_pretrained("org/encoder")' in card
    assert 'PeftModel.from_pretrained(base, "me/cls-lora")' in card
    assert "loratools merge org/encoder me/cls-lora -o merged/" in card
    assert "BASE_MODEL" in render_card(
        adapter, CardFacts(repo_id="me/cls-lora")
    )  # unknown base: a placeholder


@pytest.mark.parametrize(
    ("base", "expected"),
    [("org/base", "org/base"), ("org/base@v1", "org/base"), ("/models/base", None), ("./base", None)],
)
def test_extract_card_names_only_a_hub_id_as_base_model(fixtures_dir, base, expected):
    from loratools.commands.extract import model_card
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.extract import ExtractOptions, extract

    ckpts = [open_checkpoint(fixtures_dir / name) for name in ("base", "finetuned")]
    result = extract(*ckpts, ExtractOptions(rank=2), base_model=base, finetuned_model="org/ft")
    assert _front(model_card(result)).get("base_model") == expected
