"""A kohya-named LoKr file with full ``ss_*`` metadata: inspect, spectrum and convert without a base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.formats import kohya

Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_conv_in"
METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_args": json.dumps({"algo": "lokr", "factor": "4", "conv_dim": "4", "conv_alpha": "4"}),
    "ss_network_dim": "2",
    "ss_network_alpha": "1",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_num_epochs": "10",
    "ss_max_train_steps": "1000",
    "ss_learning_rate": "0.0001",
    "ss_output_name": "tiny_lokr",
}


@pytest.fixture
def lokr_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tensors = {
        f"{PROJ}.lokr_w1": rand(4, 4), f"{PROJ}.lokr_w2_a": rand(8, 2), f"{PROJ}.lokr_w2_b": rand(2, 8),
        f"{PROJ}.alpha": torch.tensor(1.0),
        f"{Q}.lokr_w1": rand(2, 2), f"{Q}.lokr_w2": rand(16, 16), f"{Q}.alpha": torch.tensor(8.0),
        f"{CONV}.lokr_w1": rand(2, 2), f"{CONV}.lokr_w2": rand(4, 2, 3, 3), f"{CONV}.alpha": torch.tensor(4.0),
    }  # fmt: skip
    path = tmp_path / "tiny_lokr.safetensors"
    save_file(tensors, str(path), metadata=METADATA)
    return path


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    adapter = kohya.to_adapter(load_file(str(path)), {}, keep_stems=True)
    return {name: w.delta().double() for name, w in adapter.weights.items()}


def test_inspect_names_the_kind_and_the_training(run_cli, lokr_file: Path) -> None:
    result = run_cli("inspect", lokr_file, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kinds"] == {"lokr": 3}
    assert report["tensors"] == 3 + 2 + 2  # the factor tensors stored: PROJ w1, w2_a, w2_b; Q and CONV w1, w2
    conv = report["lycoris_modules"][CONV]
    assert conv["factors"] == {"lokr_w1": [2, 2], "lokr_w2": [4, 2, 3, 3]} and conv["weight_shape"] == [
        8,
        4,
        3,
        3,
    ]
    assert conv["scale"] == 1.0  # LyCORIS: both factors full, alpha ignored
    assert report["lycoris_modules"][PROJ]["scale"] == 0.5  # alpha / dim = 1 / 2
    training = report["provenance"]["kohya"]
    assert training["algo"] == "lokr" and training["training"]["base_model_version"] == "sdxl_base_v1-0"


def test_spectrum_is_exact_without_a_base(run_cli, lokr_file: Path) -> None:
    result = run_cli("spectrum", lokr_file, "--json")
    assert result.exit_code == 0, result.output
    deltas = _deltas(lokr_file)
    for module in json.loads(result.stdout)["modules"]:
        dense = torch.linalg.svdvals(deltas[module["name"]])
        s = torch.tensor(module["singular_values"], dtype=torch.float64)
        n = min(len(s), len(dense))
        # float32 SVDs of the small factors vs a float64 dense SVD: a few ulps of σ₁
        torch.testing.assert_close(s[:n], dense[:n], rtol=1e-4, atol=1e-5 * float(dense[0]))
    assert CONV in {m["name"] for m in json.loads(result.stdout)["modules"]}


def test_convert_to_a_kohya_lora_at_the_optimum(run_cli, lokr_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.safetensors"
    result = run_cli("convert", lokr_file, "--to", "kohya", "-o", out, "-r", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    converted = load_file(str(out))
    assert converted[f"{CONV}.lora_down.weight"].shape == (4, 4, 3, 3)  # conv kept as conv LoRA
    assert converted[f"{CONV}.lora_up.weight"].shape == (8, 4, 1, 1)
    deltas, new = _deltas(lokr_file), _deltas(out)
    for record in report["lycoris_converted"]:
        name = record["name"]
        s = torch.linalg.svdvals(deltas[name])
        optimum = float(s[record["rank"] :].square().sum().sqrt())
        error = float((deltas[name] - new[name]).norm())
        assert error <= 1.001 * optimum + 1e-5 * float(s[0])  # Eckart–Young, float32 SVDs
        assert record["relative_error"] == pytest.approx(
            error / float(deltas[name].norm()), rel=1e-3, abs=1e-6
        )


def test_without_a_rank_rule_a_lora_format_is_refused_by_kind(
    run_cli, lokr_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora.safetensors"
    result = run_cli("convert", lokr_file, "--to", "kohya", "-o", out)
    assert result.exit_code == 1
    assert "LoKr module" in result.stderr and "-r" in result.stderr
    assert not out.exists()


def test_a_peft_loha_converted_at_full_energy_gives_peft_the_same_logits(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    from peft import LoHaConfig, PeftModel, get_peft_model

    from tests.peft_helpers import load_llama, logits, logits_through_peft, tokens

    model = get_peft_model(
        load_llama(fixtures_dir / "base"),
        LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    loha = tmp_path / "loha"
    model.save_pretrained(loha)
    out = tmp_path / "lora"
    result = run_cli("convert", loha, "--to", "peft", "-o", out, "--energy", "1.0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = tokens()
    expected = logits(PeftModel.from_pretrained(load_llama(fixtures_dir / "base"), loha).eval(), ids)
    # it does act: the adapter moves logits by far more than float32 noise (1e-2 ≫ LOGITS_FP32)
    assert not torch.allclose(expected, logits(load_llama(fixtures_dir / "base"), ids), atol=1e-2)
    # float32 logits through two layers' worth of differently ordered sums (tests/tolerances.py)
    torch.testing.assert_close(
        logits_through_peft(fixtures_dir / "base", out, ids), expected, rtol=1e-4, atol=1e-4
    )
