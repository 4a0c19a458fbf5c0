"""Every command names what it got (issue 12 §2, §4, §5): wrong-kind arguments, LyCORIS files,
GGUF files, and foreign kohya files used without a base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.formats import kohya
from loratools.io.adapter_dir import load_adapter, read_safetensors

STEM = "lora_unet_model_layers_0_self_attn_q_proj"


def refused(result, *fragments: str) -> str:
    """An exit-1 refusal on one ``error:`` line holding every fragment."""
    assert result.exit_code == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def training_metadata(entries: int) -> dict[str, str]:
    """sd-scripts-style ``ss_*`` metadata: the settings that matter plus ``entries`` filler keys."""
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
        "ss_network_args": json.dumps({"algo": "lokr", "factor": "8"}),
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_resolution": "(1024, 1024)",
        "ss_num_epochs": "10",
        "ss_max_train_steps": "2000",
        "ss_learning_rate": "0.0001",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_num_train_images": "120",
    }
    metadata.update({f"ss_tag_{i}": f"tag number {i}" for i in range(entries)})
    return metadata


def lycoris_file(path: Path, parts: dict[str, tuple[int, ...]]) -> Path:
    """A kohya-named LyCORIS file, 3 modules of ``parts``, with ~420 metadata entries as sd-scripts writes."""
    tensors = {}
    for n in range(3):
        stem = f"lora_unet_input_blocks_{n}_proj_in"
        tensors |= {f"{stem}.{part}": torch.ones(shape) for part, shape in parts.items()}
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path, metadata=training_metadata(410))
    return path


@pytest.fixture
def lokr_file(tmp_path: Path) -> Path:
    return lycoris_file(tmp_path / "lokr.safetensors", {"lokr_w1": (4, 4), "lokr_w2": (8, 8)})


@pytest.fixture
def oft_file(tmp_path: Path) -> Path:
    """An OFT file: a kind loratools names but does not load (nor plans to, yet)."""
    return lycoris_file(tmp_path / "oft.safetensors", {"oft_blocks": (4, 8, 8)})


@pytest.fixture
def foreign_kohya(fixtures_dir: Path, tmp_path: Path) -> Path:
    """The fixture adapter as kohya tensors with only ``ss_*`` metadata (no loratools record)."""
    tensors, metadata, _ = kohya.from_adapter(load_adapter(fixtures_dir / "adapter"))
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, path, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    return path


# -- §2: arguments of the wrong kind --------------------------------------------------------------
@pytest.mark.parametrize("order", ["base first", "adapter first"])
def test_spectrum_of_base_and_adapter_says_which_is_which(run_cli, fixtures_dir: Path, order: str) -> None:
    base, adapter = fixtures_dir / "base", fixtures_dir / "adapter"
    args = (base, adapter) if order == "base first" else (adapter, base)
    line = refused(run_cli("spectrum", *args), f"{adapter} is a PEFT LoRA adapter", "safetensors checkpoint")
    assert f"loratools spectrum {adapter} --base {base}" in line


def test_convert_an_adapter_to_safetensors_is_refused_before_writing(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    refused(
        run_cli("convert", fixtures_dir / "adapter", "--to", "safetensors", "-o", out),
        "a PEFT LoRA adapter",
        "--to safetensors converts models",
        "--to peft, --to kohya or --to gguf",
    )
    assert list(tmp_path.iterdir()) == []


def test_convert_a_model_to_an_adapter_format_is_refused(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    refused(
        run_cli("convert", fixtures_dir / "base", "--to", "kohya", "-o", out),
        "not an adapter",
        "--to safetensors",
    )
    assert not out.exists()


# -- §4: LyCORIS files are named, summarised, and refused by name ---------------------------------
def test_inspect_names_a_lokr_file_and_summarises_its_training(run_cli, lokr_file: Path) -> None:
    result = run_cli("inspect", lokr_file)
    assert result.exit_code == 0, result.stderr
    assert "a kohya LoKr adapter" in result.stderr and "checkpoint" not in result.stderr
    assert "training network: network_module lycoris.kohya, network_dim 8" in result.stderr
    assert "training optimizer: optimizer bitsandbytes.optim.adamw.AdamW8bit" in result.stderr
    assert "ss_tag_7" not in result.stderr  # the raw metadata stays out of the terminal …
    assert len(result.stderr.splitlines()) < 60
    summary = json.loads(run_cli("inspect", lokr_file, "--json").stdout)
    assert summary["metadata"]["ss_tag_7"] == "tag number 7"  # … and all of it is in --json
    assert summary["algorithm"] == "LoKr" and summary["label"] == "a kohya LoKr adapter"
    assert summary["training"]["dataset"] == "num_train_images 120"


def test_inspect_summarises_an_adapter_it_does_not_load_from_its_tensors(run_cli, oft_file: Path) -> None:
    summary = json.loads(run_cli("inspect", oft_file, "--json").stdout)
    assert summary["label"] == "a kohya OFT adapter" and summary["supported"] is False
    assert summary["modules"] == 3 and summary["tensors"] == 6
    assert summary["parts"] == {"alpha": 3, "oft_blocks": 3}
    assert summary["parameters"] == 3 * (4 * 8 * 8 + 1)


@pytest.mark.parametrize(
    "command",
    [
        ["spectrum", "{f}"],
        ["convert", "{f}", "--to", "peft", "-o", "{tmp}/o"],
        ["resize", "{f}", "-r", "2", "-o", "{tmp}/o"],
        ["similarity", "{f}", "{f}"],
        ["combine", "{f}", "-o", "{tmp}/o"],
        ["merge", "{base}", "{f}", "-o", "{tmp}/o"],
    ],
)
def test_every_command_refuses_an_oft_file_by_name(
    run_cli, fixtures_dir: Path, oft_file: Path, tmp_path: Path, command: list[str]
) -> None:
    names = {"f": oft_file, "tmp": tmp_path, "base": fixtures_dir / "base"}
    refused(run_cli(*(a.format(**names) for a in command)), "a kohya OFT adapter: not supported")
    assert not (tmp_path / "o").exists()


def test_a_peft_type_loratools_does_not_know_is_named_from_the_config(run_cli, fixture_copy) -> None:
    folder = fixture_copy("adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "VERA"}))
    result = run_cli("inspect", folder)
    assert result.exit_code == 0 and "a PEFT VERA adapter" in result.stderr
    refused(run_cli("spectrum", folder), "a PEFT VERA adapter: not supported")


# -- §4: GGUF ---------------------------------------------------------------------------------------
def test_inspect_reads_a_gguf_adapter_loratools_wrote(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    out = tmp_path / "a.gguf"
    converted = run_cli(
        "convert", fixtures_dir / "adapter", "--to", "gguf", "-o", out, "--base", fixtures_dir / "base", "-q"
    )
    assert converted.exit_code == 0, converted.stderr
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["kind"] == "adapter" and summary["label"] == "a GGUF LoRA adapter (llama)"
    assert summary["architecture"] == "llama" and summary["tensors"] == 8
    assert summary["ranks"] == {"4": 4} and summary["alpha"] == pytest.approx(8.0)
    assert summary["target_modules"] == ["attn_q", "attn_v"]
    assert summary["tensor_types"] == {"F32": 8}
    table = run_cli("inspect", out)
    assert table.exit_code == 0 and "a GGUF LoRA adapter (llama)" in table.stderr


def test_inspect_reads_a_quantized_gguf_model(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from tests.io.test_gguf_io import write_gguf_model

    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", qtype="Q8_0")
    summary = json.loads(run_cli("inspect", tmp_path / "m.gguf", "--json").stdout)
    assert summary["kind"] == "checkpoint" and summary["label"] == "a GGUF model (llama, Q8_0)"
    assert summary["tensors"] == 21 and summary["parameters"] == 22688  # the fixture's count
    assert summary["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert summary["config"]["block_count"] == 2


# -- §5: foreign kohya files without a base ---------------------------------------------------------
def test_inspect_and_spectrum_keep_kohya_names_without_a_base(
    run_cli, fixtures_dir: Path, foreign_kohya: Path
) -> None:
    summary = json.loads(run_cli("inspect", foreign_kohya, "--json").stdout)
    assert summary["label"] == "a kohya LoRA adapter" and summary["modules"] == 4
    assert "pass --base" in summary["module_names"]
    with_stems = json.loads(run_cli("spectrum", foreign_kohya, "--json").stdout)
    resolved = json.loads(run_cli("spectrum", fixtures_dir / "adapter", "--json").stdout)
    assert sorted(m["name"] for m in with_stems["modules"]) == sorted(
        kohya.kohya_stem(m["name"]) for m in resolved["modules"]
    )
    by_stem = {m["name"]: m for m in with_stems["modules"]}
    for module in resolved["modules"]:
        ours = by_stem[kohya.kohya_stem(module["name"])]["singular_values"]
        assert ours == pytest.approx(module["singular_values"], rel=1e-6)  # same factors, same math


def test_similarity_of_a_foreign_kohya_file_with_itself(run_cli, foreign_kohya: Path) -> None:
    result = run_cli("similarity", foreign_kohya, foreign_kohya, "--json")
    assert result.exit_code == 0, result.stderr
    modules = json.loads(result.stdout)["modules"]
    assert len(modules) == 4 and all(m["name"].startswith("lora_unet_") for m in modules)
    assert all(m["diagonal"][-1] == pytest.approx(1.0, abs=1e-5) for m in modules)  # φ(r, r) of a copy


def test_resize_writes_kohya_back_with_the_same_names(run_cli, foreign_kohya: Path, tmp_path: Path) -> None:
    out = tmp_path / "r2.safetensors"
    result = run_cli("resize", foreign_kohya, "-r", "2", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert (
        f"{foreign_kohya}: a kohya LoRA adapter, 4 modules; module names as in the kohya file"
        in result.stderr
    )
    before, _ = read_safetensors(foreign_kohya)
    after, _ = read_safetensors(out)
    assert set(after) == set(before)
    assert all(after[k].shape[0] == 2 for k in after if k.endswith(".lora_down.weight"))


def test_peft_output_of_a_foreign_kohya_file_needs_the_base(
    run_cli, fixtures_dir: Path, foreign_kohya: Path, tmp_path: Path
) -> None:
    for command in (["resize", "-r", "2"], ["combine"]):
        line = refused(run_cli(command[0], foreign_kohya, *command[1:], "-o", tmp_path / "o"), "--base")
        assert "kohya names" in line and not (tmp_path / "o").exists()
    for command in (["resize", "-r", "2"], ["combine"]):
        ok = run_cli(
            command[0],
            foreign_kohya,
            *command[1:],
            "-o",
            tmp_path / command[0],
            "--base",
            fixtures_dir / "base",
            "-q",
        )
        assert ok.exit_code == 0, ok.stderr
        config = json.loads((tmp_path / command[0] / "adapter_config.json").read_text())
        assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {"q_proj", "v_proj"}


def test_combine_of_two_foreign_kohya_files_stays_kohya(run_cli, foreign_kohya: Path, tmp_path: Path) -> None:
    out = tmp_path / "sum.safetensors"
    result = run_cli("combine", foreign_kohya, foreign_kohya, "-w", "0.5", "-w", "0.5", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    before, _ = read_safetensors(foreign_kohya)
    after, _ = read_safetensors(out)
    assert {k.split(".")[0] for k in after} == {k.split(".")[0] for k in before}


def test_a_cloneofsimo_file_is_named_and_summarised(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "safeloras.safetensors"
    tensors = {f"unet:{i}:{side}": torch.ones(4, 2) if side == "up" else torch.ones(2, 4) for i in range(3)
               for side in ("up", "down")}  # fmt: skip
    save_file(tensors, path, metadata={"unet": json.dumps(["CrossAttention"]), "unet:0:rank": "2"})
    summary = json.loads(run_cli("inspect", path, "--json").stdout)
    assert summary["label"] == "a cloneofsimo lora LoRA adapter" and summary["supported"] is False
    assert summary["modules"] == 3 and summary["parts"] == {"down": 3, "up": 3}
    refused(run_cli("spectrum", path), "a cloneofsimo lora LoRA adapter: not supported")


def test_a_pipe_is_refused_not_read(run_cli, tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    refused(run_cli("inspect", fifo), "not a regular file")


def test_a_pytorch_folder_is_named_and_read(run_cli, tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "pytorch_model.bin")
    result = run_cli("inspect", tmp_path)
    assert result.exit_code == 0 and f"{tmp_path}: a PyTorch checkpoint\n" in result.stderr
    assert json.loads(run_cli("inspect", tmp_path, "--json").stdout)["parameters"] == 6


def test_convert_of_a_foreign_kohya_file(
    run_cli, fixtures_dir: Path, foreign_kohya: Path, tmp_path: Path
) -> None:
    refused(run_cli("convert", foreign_kohya, "--to", "peft", "-o", tmp_path / "p"), "--base", "--to kohya")
    assert not (tmp_path / "p").exists()
    out = tmp_path / "same.safetensors"
    assert run_cli("convert", foreign_kohya, "--to", "kohya", "-o", out, "-q").exit_code == 0
    before, _ = read_safetensors(foreign_kohya)
    after, _ = read_safetensors(out)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    ok = run_cli(
        "convert", foreign_kohya, "--to", "peft", "-o", tmp_path / "p", "--base", fixtures_dir / "base"
    )
    assert ok.exit_code == 0 and "a kohya LoRA adapter → a PEFT adapter folder" in ok.stderr


def test_spectrum_names_its_inputs(run_cli, fixtures_dir: Path, foreign_kohya: Path) -> None:
    result = run_cli("spectrum", fixtures_dir / "base", fixtures_dir / "finetuned")
    assert result.exit_code == 0, result.stderr
    assert f"{fixtures_dir / 'base'}: a safetensors checkpoint\n" in result.stderr
    document = json.loads(run_cli("spectrum", foreign_kohya, "--json").stdout)
    assert document["kinds"] == ["a kohya LoRA adapter"]


def test_similarity_of_kohya_names_and_module_paths_asks_for_the_base(
    run_cli, fixtures_dir: Path, foreign_kohya: Path
) -> None:
    refused(run_cli("similarity", foreign_kohya, fixtures_dir / "adapter"), "kohya names", "--base")
    result = run_cli(
        "similarity", foreign_kohya, fixtures_dir / "adapter", "--base", fixtures_dir / "base", "--json"
    )
    assert result.exit_code == 0, result.stderr
    modules = json.loads(result.stdout)["modules"]
    # φ(A, A) diagonal = 1 up to float32 bases
    assert len(modules) == 4 and all(m["diagonal"][-1] == pytest.approx(1.0, abs=1e-5) for m in modules)


def test_combine_of_kohya_names_with_module_paths_asks_for_the_base(
    run_cli, fixtures_dir: Path, foreign_kohya: Path, tmp_path: Path
) -> None:
    refused(
        run_cli("combine", foreign_kohya, fixtures_dir / "adapter", "-o", tmp_path / "o.safetensors"),
        "--base",
    )
    assert not (tmp_path / "o.safetensors").exists()
    base = fixtures_dir / "base"
    ok = run_cli(
        "combine", foreign_kohya, fixtures_dir / "adapter", "-o", tmp_path / "o", "--base", base, "-q"
    )
    assert ok.exit_code == 0, ok.stderr
    summed = load_adapter(tmp_path / "o")
    assert len(summed.weights) == 4 and all(w.rank == 8 for w in summed.weights.values())  # exact sum: r + r
