"""``loratools doctor`` on real files, with the runtimes that are installed here as the judges:
PEFT loads what doctor says PEFT loads and refuses what it says PEFT refuses; llama.cpp's own
converter (../shared/tools/llama.cpp, skipped when absent) stops at a DoRA adapter and copies an
rsLoRA adapter's alpha unscaled; diffusers' kohya converter rejects a LoHa file and takes a LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import save_adapter
from tests.llama_cpp import LLAMA_CPP
from tests.ops.test_dora import make_peft_dora
from tests.peft_helpers import load_llama

needs_llama_cpp = pytest.mark.skipif(
    not (LLAMA_CPP / "convert_lora_to_gguf.py").is_file(), reason="no llama.cpp"
)
Q_PROJ = "model.layers.0.self_attn.q_proj"  # 32 × 32 in the fixture base


def doctor(run_cli, *args: object) -> tuple[int, dict]:
    result = run_cli("doctor", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def findings(document: dict, runtime: str) -> dict[str, dict]:
    verdict = next(r for r in document["runtimes"] if r["runtime"] == runtime)
    return {f["rule"]: f for f in verdict["findings"]}


def verdict(document: dict, runtime: str) -> str:
    return next(r["verdict"] for r in document["runtimes"] if r["runtime"] == runtime)


def lora_adapter(tmp_path: Path, name: str, rank: int, *, rslora: bool = False, zero_b: bool = False) -> Path:
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, 32, generator=gen) * 0.1
    b = torch.zeros(32, rank) if zero_b else torch.randn(32, rank, generator=gen) * 0.1
    adapter = Adapter({Q_PROJ: LoraWeight(a, b, float(2 * rank), use_rslora=rslora)}, task_type="CAUSAL_LM")
    return save_adapter(adapter, tmp_path / name)


def test_a_plain_adapter_loads_in_peft_and_needs_conversion_for_llama_cpp(
    run_cli, fixtures_dir: Path
) -> None:
    from peft import PeftModel

    code, doc = doctor(run_cli, fixtures_dir / "adapter", "--base", fixtures_dir / "base")
    assert code == 0
    assert verdict(doc, "peft") == "loads" and verdict(doc, "vllm") == "loads"
    assert verdict(doc, "llama.cpp") == "loads with changes"
    fix = findings(doc, "llama.cpp")["llama.cpp.format"]["fix"]
    assert (
        fix
        == f"loratools convert {fixtures_dir / 'adapter'} --to gguf --base {fixtures_dir / 'base'} -o adapter.gguf"
    )
    assert doc["not_checked"] == ["diffusers", "comfyui"]
    assert not doc["general"]  # names, shapes and float32 merge precision all fine
    PeftModel.from_pretrained(load_llama(fixtures_dir / "base"), fixtures_dir / "adapter")  # the judge agrees


def test_rank_above_vllms_cap_fails_and_its_fix_works(run_cli, tmp_path: Path) -> None:
    adapter = lora_adapter(tmp_path, "r32", 32)
    code, doc = doctor(run_cli, adapter, "--for", "vllm")
    assert code == 1
    rule = findings(doc, "vllm")["vllm.max_lora_rank"]
    assert rule["modules"] == [Q_PROJ] and "--max-lora-rank 32" in rule["message"]
    fix = rule["fix"].split()[1:]
    fix[fix.index("-o") + 1] = str(tmp_path / "resized")
    assert run_cli(*fix).exit_code == 0
    assert doctor(run_cli, tmp_path / "resized", "--for", "vllm")[0] == 0


def test_a_zero_update_and_a_rank_as_large_as_the_weight_are_reported(run_cli, tmp_path: Path) -> None:
    code, doc = doctor(run_cli, lora_adapter(tmp_path, "zero", 32, zero_b=True), "--for", "peft")
    rules = {f["rule"] for f in doc["general"]}
    assert {"general.zero_update", "general.rank_exceeds_dims"} <= rules
    assert code == 0  # neither stops PEFT from loading it


def test_a_base_without_the_modules_is_a_blocker(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = LoraWeight(torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen), 4.0)
    path = save_adapter(Adapter({"model.layers.7.self_attn.q_proj": weight}), tmp_path / "far")
    code, doc = doctor(run_cli, path, "--base", fixtures_dir / "base", "--for", "peft")
    assert code == 1
    (missing,) = [f for f in doc["general"] if f["rule"] == "general.base_missing_modules"]
    assert missing["modules"] == ["model.layers.7.self_attn.q_proj"]


def test_dora_is_refused_by_vllm_and_llama_cpp_and_the_fix_bakes_it(run_cli, fixtures_dir, tmp_path) -> None:
    dora = make_peft_dora(fixtures_dir / "base", tmp_path / "dora")
    code, doc = doctor(run_cli, dora, "--base", fixtures_dir / "base", "--for", "vllm,llama.cpp,peft")
    assert code == 1
    assert verdict(doc, "peft") == "loads"
    assert "vllm.dora" in findings(doc, "vllm") and "llama.cpp.dora" in findings(doc, "llama.cpp")
    fix = findings(doc, "vllm")["vllm.dora"]["fix"].split()[1:]
    fix[fix.index("-o") + 1] = str(tmp_path / "baked")
    assert run_cli(*fix).exit_code == 0
    assert doctor(run_cli, tmp_path / "baked", "--for", "vllm")[0] == 0


def test_kohya_files_are_refused_by_peft_as_peft_itself_refuses_them(run_cli, fixtures_dir, tmp_path) -> None:
    from peft import PeftModel

    kohya = tmp_path / "kohya" / "lora.safetensors"
    kohya.parent.mkdir()
    assert run_cli("convert", fixtures_dir / "adapter", "--to", "kohya", "-o", kohya).exit_code == 0
    code, doc = doctor(run_cli, kohya, "--for", "peft")
    assert code == 1 and "peft.format" in findings(doc, "peft")
    with pytest.raises((ValueError, OSError)):  # the judge: no adapter_config.json to read
        PeftModel.from_pretrained(load_llama(fixtures_dir / "base"), kohya.parent)


def sd_kohya(path: Path, algorithm: str) -> Path:
    """A tiny SD-style kohya file (UNet proj_in, 8 × 4): LoRA or LoHa keys."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    gen = torch.Generator().manual_seed(1)
    if algorithm == "LoRA":
        parts = {
            "lora_down.weight": torch.randn(2, 4, generator=gen),
            "lora_up.weight": torch.randn(8, 2, generator=gen),
        }
    else:
        parts = {name: torch.randn(*shape, generator=gen)
                 for name, shape in (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 4)))}  # fmt: skip
    tensors = {f"{stem}.{name}": t for name, t in parts.items()} | {f"{stem}.alpha": torch.tensor(2.0)}
    save_file(
        tensors,
        str(path),
        metadata={"ss_network_module": "networks.lora" if algorithm == "LoRA" else "lycoris.kohya"},
    )
    return path


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa"])
def test_diffusers_verdict_agrees_with_diffusers_kohya_converter(
    run_cli, tmp_path: Path, algorithm: str
) -> None:
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    path = sd_kohya(tmp_path / f"{algorithm}.safetensors", algorithm)
    code, doc = doctor(run_cli, path, "--for", "diffusers")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if algorithm == "LoRA":
        assert code == 0 and verdict(doc, "diffusers") == "loads"
        conversion._convert_non_diffusers_lora_to_diffusers(state)  # the judge takes it
    else:
        assert code == 1 and "diffusers.lycoris" in findings(doc, "diffusers")
        with pytest.raises(ValueError, match="not been correctly renamed"):
            conversion._convert_non_diffusers_lora_to_diffusers(state)


def llama_cpp_convert(adapter: Path, base: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    command = [sys.executable, str(LLAMA_CPP / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base),
               "--outfile", str(out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_converter_stops_at_dora_as_doctor_says(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    dora = make_peft_dora(fixtures_dir / "base", tmp_path / "dora")
    assert "llama.cpp.dora" in findings(doctor(run_cli, dora, "--for", "llama.cpp")[1], "llama.cpp")
    done = llama_cpp_convert(dora, fixtures_dir / "base", tmp_path / "dora.gguf")
    assert done.returncode != 0 and "lora_magnitude_vector" in done.stdout + done.stderr


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_converter_drops_the_rslora_scale_as_doctor_says(run_cli, fixtures_dir, tmp_path) -> None:
    import gguf

    adapter = lora_adapter(tmp_path, "rs", 4, rslora=True)  # alpha 8, scale 8/√4 = 4
    document = doctor(run_cli, adapter, "--base", fixtures_dir / "base", "--for", "llama.cpp")[1]
    rule = findings(document, "llama.cpp")["llama.cpp.rslora"]
    assert rule["effect"] == "applies with a different scale"
    done = llama_cpp_convert(adapter, fixtures_dir / "base", tmp_path / "theirs.gguf")
    assert done.returncode == 0, done.stderr

    def alpha(path: Path) -> float:
        field = gguf.GGUFReader(path).fields["adapter.lora.alpha"]
        return float(field.parts[field.data[0]][0])

    assert alpha(tmp_path / "theirs.gguf") / 4 == pytest.approx(2.0)  # alpha/r: half of rsLoRA's scale 4
    fix = rule["fix"].split()[1:]
    fix[fix.index("-o") + 1] = str(tmp_path / "ours.gguf")
    assert run_cli(*fix).exit_code == 0
    assert alpha(tmp_path / "ours.gguf") / 4 == pytest.approx(4.0)  # the fix keeps the scale


def test_errors_are_one_line(run_cli, fixtures_dir: Path) -> None:
    model = run_cli("doctor", fixtures_dir / "base")
    assert model.exit_code == 1 and "not an adapter" in model.stderr and len(model.stderr.splitlines()) == 1
    bogus = run_cli("doctor", fixtures_dir / "adapter", "--for", "onnx")
    assert bogus.exit_code == 1 and "unknown runtime" in bogus.stderr


def test_the_table_names_verdicts_and_fixes(run_cli, tmp_path: Path) -> None:
    result = run_cli("doctor", lora_adapter(tmp_path, "r32", 32), "--for", "vllm,llama.cpp")
    assert result.exit_code == 1
    assert "will not load" in result.stderr and "loads with changes" in result.stderr
    assert "fix: loratools resize" in result.stderr and "source: vLLM" in result.stderr
