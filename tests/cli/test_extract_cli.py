"""Tests for ``loratools extract``: the CLI contract, and PEFT/transformers loading what it writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.io.adapter_dir import load_adapter


def extract_json(run_cli, fixtures_dir: Path, out: Path, *flags: str) -> dict:
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-o", out, "--json", *flags
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_document_and_output_files(run_cli, fixtures_dir, tmp_path):
    out = tmp_path / "adapter"
    summary = extract_json(run_cli, fixtures_dir, out, "-r", "4")
    assert summary["output"] == str(out)
    assert len(summary["modules"]) == 14
    # the fixtures' rank-4 ΔW plus 1e-3 noise: what rank 4 leaves is the noise, 1.9–4.6% of ‖ΔW‖ (measured)
    assert all(m["rank"] == 4 and 0 < m["relative_error"] < 0.05 for m in summary["modules"])
    assert summary["unchanged"] == 7  # embeddings, norms, lm_head
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 4, "CAUSAL_LM")
    adapter = load_adapter(out)
    assert adapter.provenance["method"] == "extract" and adapter.provenance["rank"] == 4
    assert adapter.weights["model.layers.0.mlp.up_proj"].dtype == torch.float32  # the fine-tune's dtype
    assert "finetuned" in (out / "README.md").read_text()


def test_table_on_stderr_and_nothing_on_stdout(run_cli, fixtures_dir, tmp_path):
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "2", "-o", tmp_path / "a"
    )
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "model.layers.1.mlp.down_proj" in result.stderr and "relative error" in result.stderr


def test_existing_output_needs_force(run_cli, fixtures_dir, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "2", "-o", out)
    refused = run_cli(*args)
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(*args, "--force").exit_code == 0
    assert (out / "adapter_config.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [(("-r", "4", "--energy", "0.9"), "choose exactly one"), (("--energy", "2"), "--energy must be in"),
     (("-r", "4", "--targets", "nothing_here"), "no 2-D weight")],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(run_cli, fixtures_dir, tmp_path, flags, message):
    result = run_cli(
        "extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-o", tmp_path / "a", *flags
    )
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "a").exists()


def test_shape_mismatch_is_a_clear_error(run_cli, fixtures_dir, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(fixtures_dir / "finetuned", ft)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.embed_tokens.weight"] = torch.cat(
        [tensors["model.embed_tokens.weight"], torch.ones(2, 32)]
    )
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("extract", fixtures_dir / "base", ft, "-r", "2", "-o", tmp_path / "a")
    assert result.exit_code == 1
    assert (
        "model.embed_tokens.weight [64, 32] → [66, 32]" in result.stderr
        and "--include-embeddings" in result.stderr
    )
    ok = run_cli(
        "extract", fixtures_dir / "base", ft, "-r", "2", "-o", tmp_path / "b", "--include-embeddings"
    )
    assert ok.exit_code == 0, ok.output
    assert load_adapter(tmp_path / "b").saved_modules["model.embed_tokens.weight"].shape == (66, 32)


def test_output_inside_an_input_is_refused(run_cli, fixture_copy, fixtures_dir):
    ft = fixture_copy("finetuned")
    result = run_cli("extract", fixtures_dir / "base", ft, "-r", "2", "-o", ft / "adapter")
    assert result.exit_code == 1 and "overlaps the input" in result.stderr


def test_budget_writes_rank_pattern(run_cli, fixtures_dir, tmp_path):
    out = tmp_path / "adapter"
    summary = extract_json(
        run_cli, fixtures_dir, out, "--budget", "40", "--targets", "q_proj,v_proj,down_proj"
    )
    ranks = {m["name"]: m["rank"] for m in summary["modules"]}
    assert sum(ranks.values()) == 40 and len(ranks) == 6
    config = json.loads((out / "adapter_config.json").read_text())
    for name, rank in ranks.items():
        assert config["rank_pattern"].get(name, config["r"]) == rank


@pytest.mark.parametrize(
    ("targets", "count"),
    [
        (("q_proj,v_proj",), 4),
        (("q_proj", "o_proj"), 4),
        ((r"model\.layers\.[0-9]{1,2}\.self_attn\.q_proj",), 2),
    ],
)
def test_targets_flag_takes_names_or_one_regex(run_cli, fixtures_dir, tmp_path, targets, count):
    flags = [arg for target in targets for arg in ("--targets", target)]
    summary = extract_json(run_cli, fixtures_dir, tmp_path / "a", "-r", "2", *flags)
    assert len(summary["modules"]) == count


def test_dtype_option(run_cli, fixtures_dir, tmp_path):
    extract_json(run_cli, fixtures_dir, tmp_path / "a", "-r", "2", "--dtype", "bfloat16")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


# -- judged by PEFT and transformers -----------------------------------------------------------------------
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.double()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("-r", "4"), ("--budget", "30", "--max-rank", "6")])
def test_peft_loads_output_and_matches_finetune_within_rank_error(run_cli, fixtures_dir, tmp_path, flags):
    """PEFT on LlamaForCausalLM(base) + the extracted adapter ≈ the fine-tune, as well as rank r allows."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "adapter"
    summary = extract_json(run_cli, fixtures_dir, out, *flags)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(LlamaForCausalLM.from_pretrained(fixtures_dir / "base"), tokens)
    ft_logits = _logits(LlamaForCausalLM.from_pretrained(fixtures_dir / "finetuned"), tokens)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fixtures_dir / "base"), out)
    peft_logits = _logits(peft_model, tokens)
    # each lora_A has the rank extract chose (rank_pattern honoured)
    for module in summary["modules"]:
        layer = peft_model.get_submodule("base_model.model." + module["name"])
        assert layer.lora_A["default"].weight.shape[0] == module["rank"]
    change = float((ft_logits - base_logits).norm())
    miss = float((peft_logits - ft_logits).norm())
    assert miss <= 2 * max(m["relative_error"] for m in summary["modules"]) * change
    assert miss < 0.5 * change  # the adapter does most of the fine-tune's work
    # merging through PEFT puts exactly ΔW_r = s·B·A into each weight
    merged = peft_model.merge_and_unload().state_dict()
    adapter = load_adapter(out)
    base_weights = load_file(fixtures_dir / "base" / "model.safetensors")
    for module in adapter.weights:
        key = module + ".weight"
        # W0 + ΔW written by merge vs formed here in float32
        torch.testing.assert_close(
            merged[key], base_weights[key] + adapter.delta(module), rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_peft_loads_carried_modules(run_cli, fixtures_dir, tmp_path):
    """Changed norms and lm_head, carried with --modules-to-save/--include-embeddings, load in PEFT."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ft = tmp_path / "ft"
    shutil.copytree(fixtures_dir / "finetuned", ft)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 0.01
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "adapter"
    args = ("extract", fixtures_dir / "base", ft, "-r", "4", "-o", out)
    plain = run_cli(*args, "--json")
    assert {s["name"] for s in json.loads(plain.stdout)["skipped"]} == {"model.norm.weight", "lm_head.weight"}
    assert run_cli(*args, "--modules-to-save", "--include-embeddings", "--force").exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.norm"]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fixtures_dir / "base"), out)
    merged = model.merge_and_unload().state_dict()
    torch.testing.assert_close(merged["model.norm.weight"], tensors["model.norm.weight"])
    torch.testing.assert_close(merged["lm_head.weight"], tensors["lm_head.weight"])


def test_card_is_the_hub_card_and_never_names_a_local_base(run_cli, fixtures_dir, tmp_path, monkeypatch):
    """One card generator (loratools.hub.card): a base given as a relative local path that looks like
    an ``org/name`` Hub id (``fixtures/base``) is not written as base_model — the Hub would refuse it."""
    import re

    import yaml

    monkeypatch.chdir(fixtures_dir.parent)
    local = f"{fixtures_dir.name}/base"
    out = tmp_path / "adapter"
    result = run_cli("extract", local, fixtures_dir / "finetuned", "-r", "2", "-o", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)[1])
    assert "base_model" not in front and front["library_name"] == "peft"
    assert "## Spectrum" in card and "relative error ‖ΔW − sBA‖/‖ΔW‖" in card
