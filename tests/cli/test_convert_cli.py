"""``loratools convert``: adapters PEFT ⇄ kohya → GGUF, models .bin/GGUF → safetensors, end to end."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.adapter import Adapter, LoraWeight
from loratools.formats import gguf as gguf_names
from loratools.io.adapter_dir import save_adapter
from loratools.io.checkpoint import open_checkpoint
from tests.tolerances import LOGITS_FP32, TOL

SHAPES = {
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "o_proj": (32, 32),
    "down_proj": (32, 64),
}
MODULES = {  # module → (rank, alpha): mixed ranks and alphas, q and k to exercise the permutation
    "model.layers.0.self_attn.q_proj": (4, 8.0),
    "model.layers.0.self_attn.k_proj": (8, 8.0),
    "model.layers.1.self_attn.v_proj": (2, 5.0),
    "model.layers.1.mlp.down_proj": (6, 16.0),
}


def write_peft(folder: Path, rslora: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(7)
    weights = {}
    for module, (r, alpha) in MODULES.items():
        out, inp = SHAPES[module.rsplit(".", 1)[-1]]
        weights[module] = LoraWeight(
            torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alpha, rslora
        )
    adapter = Adapter(weights, base_model="fixtures/base", task_type="CAUSAL_LM")
    save_adapter(adapter, folder)
    return adapter


def delta_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    rtol = TOL[torch.float32]["rtol"]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_peft_to_kohya_to_peft_is_identical(run_cli, tmp_path: Path) -> None:
    write_peft(tmp_path / "peft")
    result = run_cli(
        "convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["from"] == "peft" and report["to"] == "kohya" and len(report["modules"]) == len(MODULES)
    result = run_cli("convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "back", "-q")
    assert result.exit_code == 0, result.output
    original = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == original
    before = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    after = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kohya_delta_equals_peft_delta(run_cli, tmp_path: Path) -> None:
    adapter = write_peft(tmp_path / "peft", rslora=True)
    result = run_cli(
        "convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--prefix", "lora_te"
    )
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "k.safetensors")
    for module in MODULES:
        stem = "lora_te_" + module.replace(".", "_")
        down, up, alpha = (tensors[f"{stem}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        delta_close(float(alpha) / down.shape[0] * up @ down, adapter.delta(module))


def test_foreign_kohya_needs_base_and_resolves_against_it(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {  # as sd-scripts would write it: no loratools record, one module without alpha
        "lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_model_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 4, generator=g),
        "lora_unet_model_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
        "lora_unet_model_layers_1_mlp_down_proj.lora_down.weight": torch.randn(2, 64, generator=g),
        "lora_unet_model_layers_1_mlp_down_proj.lora_up.weight": torch.randn(32, 2, generator=g),
    }
    save_file(tensors, tmp_path / "k.safetensors", metadata={"ss_network_module": "networks.lora"})
    result = run_cli("convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "p")
    assert result.exit_code == 1 and "--base" in result.stderr and not (tmp_path / "p").exists()
    result = run_cli(
        "convert",
        tmp_path / "k.safetensors",
        "--to",
        "peft",
        "-o",
        tmp_path / "p",
        "--base",
        fixtures_dir / "base",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] or config["lora_alpha"] in (2, 4)
    saved = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert set(saved) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    }
    from loratools.io.adapter_dir import load_adapter

    back = load_adapter(tmp_path / "p")
    stem = "lora_unet_model_layers_1_mlp_down_proj"
    delta_close(
        back.delta("model.layers.1.mlp.down_proj"),
        tensors[f"{stem}.lora_up.weight"] @ tensors[f"{stem}.lora_down.weight"],
    )
    q = "lora_unet_model_layers_0_self_attn_q_proj"
    expected = 2.0 / 4 * tensors[f"{q}.lora_up.weight"] @ tensors[f"{q}.lora_down.weight"]
    delta_close(back.delta("model.layers.0.self_attn.q_proj"), expected)


def test_kohya_names_that_do_not_resolve_are_listed(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    tensors = {
        "lora_unet_model_layers_9_self_attn_q_proj.lora_down.weight": torch.ones(1, 32),
        "lora_unet_model_layers_9_self_attn_q_proj.lora_up.weight": torch.ones(32, 1),
    }
    save_file(tensors, tmp_path / "k.safetensors")
    result = run_cli(
        "convert",
        tmp_path / "k.safetensors",
        "--to",
        "peft",
        "-o",
        tmp_path / "p",
        "--base",
        fixtures_dir / "base",
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and "lora_unet_model_layers_9_self_attn_q_proj" in result.stderr


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_gguf_adapter_has_llama_cpp_names_and_the_peft_delta(
    run_cli, fixtures_dir: Path, tmp_path: Path, rslora: bool
) -> None:
    gguf = pytest.importorskip("gguf")
    adapter = write_peft(tmp_path / "peft", rslora=rslora)
    out = tmp_path / "a.gguf"
    result = run_cli(
        "convert", tmp_path / "peft", "--to", "gguf", "-o", out, "--base", fixtures_dir / "base", "--json"
    )
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == (
        "adapter",
        "lora",
        "llama",
    )
    alpha = fields["adapter.lora.alpha"]
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    expected_names = {
        f"blk.{layer}.{leaf}.weight.lora_{ab}"
        for layer, leaf in ((0, "attn_q"), (0, "attn_k"), (1, "attn_v"), (1, "ffn_down"))
        for ab in "ab"
    }
    assert set(tensors) == expected_names
    for module, (r, _) in MODULES.items():
        name = gguf_names.gguf_name(f"{module}.weight")
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        out_features, in_features = SHAPES[module.rsplit(".", 1)[-1]]
        assert a.shape == (r, in_features) and b.shape == (out_features, r)
        delta = alpha / b.shape[1] * b @ a  # what llama.cpp computes
        if ".attn_q." in name:  # llama.cpp's q/k rows are permuted like the base GGUF's
            delta = gguf_names.unpermute_qk(delta, 4)
        elif ".attn_k." in name:
            delta = gguf_names.unpermute_qk(delta, 2)
        delta_close(delta, adapter.delta(module))


def test_gguf_adapter_needs_base_and_refuses_unmappable_modules(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    write_peft(tmp_path / "peft")
    result = run_cli("convert", tmp_path / "peft", "--to", "gguf", "-o", tmp_path / "a.gguf")
    assert result.exit_code == 1 and "--base" in result.stderr
    # a base whose names llama.cpp does not know (same shapes, other names)
    base = tmp_path / "odd"
    base.mkdir()
    ckpt = open_checkpoint(fixtures_dir / "base")
    renamed = {n.replace("self_attn", "attention").replace("mlp", "ffn"): t for n, t in ckpt.iter_tensors()}
    save_file(renamed, base / "model.safetensors")
    (base / "config.json").write_text((fixtures_dir / "base" / "config.json").read_text())
    adapter = Adapter(
        {"model.layers.0.attention.q_proj": LoraWeight(torch.ones(2, 32), torch.ones(32, 2), 2.0)}
    )
    save_adapter(adapter, tmp_path / "peft2")
    result = run_cli("convert", tmp_path / "peft2", "--to", "gguf", "-o", tmp_path / "a.gguf", "--base", base)
    assert result.exit_code == 1 and "model.layers.0.attention.q_proj" in result.stderr
    assert not (tmp_path / "a.gguf").exists()


def test_bin_to_safetensors_is_exact(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(fixtures_dir / "base")
    state = dict(ckpt.iter_tensors())
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"].half()
    source = tmp_path / "src"
    source.mkdir()
    torch.save(state, source / "pytorch_model.bin")
    (source / "config.json").write_text((fixtures_dir / "base" / "config.json").read_text())
    result = run_cli("convert", source, "--to", "safetensors", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["from"] == "pytorch"
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert converted.keys() == state.keys()
    for name, tensor in state.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    assert (tmp_path / "out" / "config.json").read_text() == (source / "config.json").read_text()


class Exploit:
    """A pickle that runs ``os.mkdir`` when loaded — what weights_only loading must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_bin_with_python_objects_is_refused_without_unpickling(run_cli, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": Exploit(marker)}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError):  # refused by the same loader loratools uses ...
        torch.load(tmp_path / "evil.bin", weights_only=True)
    assert not marker.exists()
    result = run_cli("convert", tmp_path / "evil.bin", "--to", "safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "weights_only" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(tmp_path / "evil.bin", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.is_dir()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_model_to_sharded_safetensors(run_cli, fixtures_dir: Path, tmp_path: Path, qtype: str) -> None:
    pytest.importorskip("gguf")
    from tests.io.test_gguf_io import write_gguf_model

    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", qtype=qtype)
    out = tmp_path / "hf"
    result = run_cli(
        "convert", tmp_path / "m.gguf", "--to", "safetensors", "-o", out, "--max-shard-size", "8KB"
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    ckpt = open_checkpoint(out)
    assert len(ckpt.files) > 1 and ckpt.names() == list(originals)
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"
    for name, tensor in ckpt.iter_tensors():
        if qtype == "F32" or tensor.ndim == 1:
            assert torch.equal(tensor, originals[name]), name
        else:  # within Q8_0's error, see tests/io/test_gguf_io.py for the exact bound
            bound = originals[name].abs().max() / 127 * 0.57
            assert float((tensor - originals[name]).abs().max()) <= float(bound), name


def test_gguf_model_dtype_option(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from tests.io.test_gguf_io import write_gguf_model

    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf")
    result = run_cli(
        "convert", tmp_path / "m.gguf", "--to", "safetensors", "-o", tmp_path / "hf", "--dtype", "bf16"
    )
    assert result.exit_code == 0, result.output
    converted = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(
        converted[n].dtype == torch.bfloat16 and torch.equal(converted[n], t.bfloat16())
        for n, t in originals.items()
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_existing_output_is_refused_and_inputs_untouched(run_cli, tmp_path: Path) -> None:
    write_peft(tmp_path / "peft")
    before = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "k.safetensors").write_bytes(b"keep me")
    result = run_cli("convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "k.safetensors").read_bytes() == b"keep me"
    result = run_cli(
        "convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--force"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "peft"]  # no temporaries left


def test_bad_output_names_and_prefix_are_one_line_errors(run_cli, tmp_path: Path) -> None:
    write_peft(tmp_path / "peft")
    for args, expected in (
        (("--to", "kohya", "-o", tmp_path / "k.bin"), ".safetensors"),
        (("--to", "kohya", "-o", tmp_path / "k.safetensors", "--prefix", "unet"), "--prefix"),
        (("--to", "safetensors", "-o", tmp_path / "m", "--max-shard-size", "lots"), "--max-shard-size"),
    ):
        result = run_cli("convert", tmp_path / "peft", *args)
        assert result.exit_code == 1 and expected in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # imports transformers (~5 s)
def test_gguf_only_model_loads_in_transformers_with_the_same_logits(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.io.test_gguf_io import write_gguf_model

    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", bpe_vocab=True)
    result = run_cli("convert", tmp_path / "m.gguf", "--to", "safetensors", "-o", tmp_path / "hf", "-q")
    assert result.exit_code == 0, result.output
    original = transformers.AutoModelForCausalLM.from_pretrained(fixtures_dir / "base")
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same float32 weights bit for bit, the same ops in one process: the same bits
        assert torch.equal(converted(tokens).logits, original(tokens).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("ab ab").input_ids[-2:] == [5, 7] and tokenizer.eos_token == "</s>"


@pytest.mark.slow  # imports peft + transformers (~10 s)
def test_real_peft_adapter_through_kohya_gives_peft_outputs(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    from tests import peft_helpers

    base = fixtures_dir / "base"
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "down_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,  # random B, so the adapter is not a no-op
    )
    torch.manual_seed(0)
    peft.get_peft_model(peft_helpers.load_llama(base), config).save_pretrained(tmp_path / "peft")
    ids = peft_helpers.tokens()
    expected = peft_helpers.logits_through_peft(base, tmp_path / "peft", ids)

    kohya_file = tmp_path / "k.safetensors"
    assert run_cli("convert", tmp_path / "peft", "--to", "kohya", "-o", kohya_file).exit_code == 0
    tensors = load_file(kohya_file)
    model = peft_helpers.load_llama(base)
    state = model.state_dict()
    weight_of = {"lora_unet_" + n.removesuffix(".weight").replace(".", "_"): n for n in state}
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert len(stems) == 6
    for stem in stems:  # merge by hand the way a kohya reader does: W += alpha/r · up @ down
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        state[weight_of[stem]] += float(tensors[f"{stem}.alpha"]) / down.shape[0] * up @ down
    model.load_state_dict(state)
    # merged by hand vs by the CLI
    torch.testing.assert_close(peft_helpers.logits(model, ids), expected, **LOGITS_FP32)

    back = tmp_path / "back"
    assert run_cli("convert", kohya_file, "--to", "peft", "-o", back).exit_code == 0
    # PEFT's forward on the converted-back adapter vs the same float32 math: one layer's order of sums
    torch.testing.assert_close(
        peft_helpers.logits_through_peft(base, back, ids), expected, rtol=1e-5, atol=1e-6
    )


def test_foreign_kohya_converts_straight_to_gguf(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(1)
    stem = "lora_unet_model_layers_1_self_attn_k_proj"
    down, up = torch.randn(3, 32, generator=g), torch.randn(16, 3, generator=g)
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, tmp_path / "k.safetensors")
    out = tmp_path / "k.gguf"
    result = run_cli(
        "convert", tmp_path / "k.safetensors", "--to", "gguf", "-o", out, "--base", fixtures_dir / "base"
    )
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    a, b = tensors["blk.1.attn_k.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]
    assert alpha == 3.0  # no .alpha in the file: alpha = r
    delta_close(gguf_names.unpermute_qk(alpha / 3 * b @ a, 2), up @ down)


def test_a_gguf_model_can_be_the_base(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from tests.io.test_gguf_io import write_gguf_model

    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", qtype="Q8_0")
    write_peft(tmp_path / "peft")
    from_dir = tmp_path / "a.gguf"
    from_gguf = tmp_path / "b.gguf"
    assert (
        run_cli(
            "convert", tmp_path / "peft", "--to", "gguf", "-o", from_dir, "--base", fixtures_dir / "base"
        ).exit_code
        == 0
    )
    result = run_cli(
        "convert", tmp_path / "peft", "--to", "gguf", "-o", from_gguf, "--base", tmp_path / "m.gguf"
    )
    assert result.exit_code == 0, result.output
    assert from_dir.read_bytes()[:4] == b"GGUF"
    import gguf

    first, second = gguf.GGUFReader(str(from_dir)), gguf.GGUFReader(str(from_gguf))
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first.tensors, second.tensors, strict=True))
    # kohya names resolve against a GGUF base too
    kohya_file = tmp_path / "k.safetensors"
    stem = "lora_unet_model_layers_0_mlp_down_proj"
    save_file(
        {f"{stem}.lora_down.weight": torch.ones(1, 64), f"{stem}.lora_up.weight": torch.ones(32, 1)},
        kohya_file,
    )
    result = run_cli(
        "convert", kohya_file, "--to", "peft", "-o", tmp_path / "p", "--base", tmp_path / "m.gguf"
    )
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in saved
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "m.gguf")  # the base it was resolved against
