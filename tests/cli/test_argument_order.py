"""Arguments in the wrong order, or a base that does not fit, get one short line that says what
each argument is and what to type instead (exit 1, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import save_adapter


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == "" and "unexpected" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        (["merge", "{adapter}", "{base}"], "did you mean `loratools merge {base} {adapter}`?"),
        (["unmerge", "{adapter}", "{base}"], "did you mean `loratools unmerge {base} {adapter}`?"),
        (
            ["swap", "{adapter}", "--remove", "{base}", "--add", "{adapter}"],
            "did you mean `loratools swap {base} --remove ADAPTER --add ADAPTER`?",
        ),
        (["extract", "{adapter}", "{base}", "-r", "2"], "did you mean `loratools merge {base} {adapter}`?"),
    ],
)
def test_swapped_arguments_are_named(run_cli, fixtures_dir: Path, tmp_path: Path, args, meant) -> None:
    names = {"adapter": fixtures_dir / "adapter", "base": fixtures_dir / "base"}
    result = run_cli(*(a.format(**names) for a in args), "-o", tmp_path / "o")
    refused(result, "the first argument is an adapter", meant.format(**names))
    assert not (tmp_path / "o").exists()


def test_an_adapter_where_the_base_goes_is_named(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    adapter = fixtures_dir / "adapter"
    refused(
        run_cli("merge", adapter, adapter, "-o", tmp_path / "o"),
        f"{adapter}: a PEFT LoRA adapter, but the first argument of merge is the BASE model",
    )
    refused(
        run_cli("extract", fixtures_dir / "base", adapter, "-r", "2", "-o", tmp_path / "o"),
        f"{adapter} is an adapter, not a checkpoint",
        "loratools merge BASE ADAPTER",
    )


def test_a_base_that_does_not_fit_is_listed_compactly(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    """12 unresolved modules and a shape misfit: the path once, a count, the common prefix once,
    and the base model the adapter records — not the path repeated for every module."""
    gen = torch.Generator().manual_seed(0)
    modules = {f"model.layers.{i}.self_attn.{p}_proj": (32, 32) for i in range(2, 8) for p in "qv"}
    modules["model.layers.0.self_attn.q_proj"] = (16, 32)
    weights = {
        m: LoraWeight(torch.randn(4, k, generator=gen), torch.randn(d, 4, generator=gen), 8.0)
        for m, (d, k) in modules.items()
    }
    adapter = tmp_path / "wrong"
    save_adapter(Adapter(weights, base_model="meta-llama/Llama-2-7b-hf"), adapter)
    result = run_cli("merge", fixtures_dir / "base", adapter, "-o", tmp_path / "o")
    refused(
        result,
        f"13 problem(s) fitting the adapter(s) to the base: {adapter}: 12 tensors (model.layers.…: "
        "2.self_attn.q_proj.weight, 2.self_attn.v_proj.weight, 3.self_attn.q_proj.weight, …) match no base tensor",
        "model.layers.0.self_attn.q_proj makes a [16, 32] update but model.layers.0.self_attn.q_proj.weight is [32, 32]",
        "it was made for base model 'meta-llama/Llama-2-7b-hf'",
    )
    assert result.stderr.count(str(adapter)) == 1 and len(result.stderr) < 600
    assert not (tmp_path / "o").exists()


def test_kohya_names_that_do_not_resolve_are_listed_compactly(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from loratools.formats import kohya
    from loratools.io.adapter_dir import load_adapter

    tensors, _, _ = kohya.from_adapter(load_adapter(fixtures_dir / "adapter"))
    foreign = {
        k.replace("lora_unet_model_layers", "lora_unet_text_model_blocks"): t for k, t in tensors.items()
    }
    path = tmp_path / "foreign.safetensors"
    save_file(foreign, path, metadata={"ss_network_module": "networks.lora"})  # no loratools record
    result = run_cli("merge", fixtures_dir / "base", path, "-o", tmp_path / "o")
    refused(
        result,
        f"{path}: 4 kohya module(s) do not resolve against the base: 4 modules (lora_unet_text_model_blocks_0_",
        "match no base module; is the base the model the adapter was made for?",
    )
    assert not (tmp_path / "o").exists()
