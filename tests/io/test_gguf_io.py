"""GGUF through the gguf package: adapter files read back by GGUFReader, models read back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools.errors import UnknownFormat
from loratools.io.checkpoint import open_checkpoint
from loratools.io.gguf_io import GgufModel, write_adapter_gguf

gguf = pytest.importorskip("gguf")

FIXTURE_CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_model(
    base_dir: Path,
    path: Path,
    qtype: str = "F32",
    tokenizer_json: str | None = None,
    bpe_vocab: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``base_dir`` (the fixture model) as a llama.cpp GGUF the way convert_hf_to_gguf does.

    Names come from gguf's own TensorNameMap, q/k rows are permuted, 1-D tensors stay F32 and 2-D
    ones are stored as ``qtype``. Returns the original tensors by Hugging Face name.
    """
    config = json.loads((base_dir / "config.json").read_text())
    ckpt = open_checkpoint(base_dir)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if tokenizer_json is not None:
        writer.add_string(gguf.Keys.Tokenizer.HF_JSON, tokenizer_json)
    if bpe_vocab:  # a byte-level BPE vocabulary the way llama.cpp stores it (Llama 3 style)
        tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab", *(f"t{i}" for i in range(56))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
        writer.add_token_merges(["a b", "Ġ ab"])
        writer.add_chat_template("{{ messages }}")
    originals = {}
    for name, tensor in ckpt.iter_tensors():
        originals[name] = tensor
        data = tensor.numpy()
        if ".q_proj." in name:
            data = llama_cpp_permute(data, config["num_attention_heads"])
        elif ".k_proj." in name:
            data = llama_cpp_permute(data, config["num_key_value_heads"])
        target = table.get_name(name, try_suffixes=(".weight", ".bias"))
        qt = gguf.GGMLQuantizationType[qtype] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(target, gguf.quants.quantize(data, qt))
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, qt), raw_dtype=qt)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


# -- models ------------------------------------------------------------------------------------------
def test_f32_gguf_model_reads_back_exactly(fixtures_dir: Path, tmp_path: Path) -> None:
    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf")
    model = GgufModel(tmp_path / "m.gguf")
    assert [s.name for s in model.specs()] == list(originals)
    assert all(s.dtype == torch.float32 for s in model.specs())
    for name, tensor in model.iter_tensors():
        assert torch.equal(tensor, originals[name]), name  # q/k un-permuted, everything bit-exact


def test_f16_gguf_keeps_float16_and_norms_float32(fixtures_dir: Path, tmp_path: Path) -> None:
    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", qtype="F16")
    model = GgufModel(tmp_path / "m.gguf")
    for name, tensor in model.iter_tensors():
        expected = originals[name].half() if originals[name].ndim == 2 else originals[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_q8_0_gguf_is_within_quantization_error(fixtures_dir: Path, tmp_path: Path) -> None:
    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", qtype="Q8_0")
    model = GgufModel(tmp_path / "m.gguf")
    quantized = 0
    for name, tensor in model.iter_tensors():
        original = originals[name]
        assert tensor.dtype == torch.float32 and tensor.shape == original.shape
        if original.ndim == 1:
            assert torch.equal(tensor, original)
            continue
        quantized += 1
        # Q8_0: blocks of 32 along a row, q = round(x/d) with d = max|x|/127, stored as f16 d':
        # |x - q·d'| <= d/2 + |q|·|d - d'| <= d·(1/2 + 127·2⁻¹¹)
        blocks = original.reshape(-1, 32)
        # + 1e-9: the float32 rounding of the bound and of the error themselves (an ulp of |x| ≲ 0.1)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-9
        error = (tensor.reshape(-1, 32) - blocks).abs()
        assert bool((error <= bound).all()), name
        assert not torch.equal(tensor, original)  # it really was quantized
    assert quantized == 16


def test_model_files_carry_config_and_tokenizer(fixtures_dir: Path, tmp_path: Path) -> None:
    tokenizer = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", tokenizer_json=tokenizer)
    files = GgufModel(tmp_path / "m.gguf").model_files()
    config = json.loads(files["config.json"])
    expected = json.loads((fixtures_dir / "base" / "config.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):  # fmt: skip
        assert config[key] == pytest.approx(expected[key]), key
    assert files["tokenizer.json"] == tokenizer
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}
    assert json.loads(files["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_no_tokenizer_is_said_not_invented(fixtures_dir: Path, tmp_path: Path) -> None:
    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf")
    model = GgufModel(tmp_path / "m.gguf")
    assert "tokenizer.json" not in model.model_files()
    assert any("no tokenizer" in note for note in model.notes)


@pytest.mark.slow  # imports transformers (~5 s)
def test_tokenizer_json_is_rebuilt_from_the_gguf_vocabulary(fixtures_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf", bpe_vocab=True)
    model = GgufModel(tmp_path / "m.gguf")
    files = model.model_files()
    encoded = tokenizers.Tokenizer.from_str(files["tokenizer.json"]).encode("ab ab")
    assert encoded.ids == [5, 7]  # "ab", "Ġab": the merges were applied
    config = json.loads(files["tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    assert config["chat_template"] == "{{ messages }}"


def test_rope_freqs_is_skipped_and_unknown_tensors_are_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    rope = {"rope_freqs.weight": np.ones(4, dtype=np.float32)}
    write_gguf_model(fixtures_dir / "base", tmp_path / "a.gguf", extra_tensors=rope)
    assert GgufModel(tmp_path / "a.gguf").skipped == ["rope_freqs.weight"]
    odd = {"blk.0.ffn_gate_exps.weight": np.ones((2, 4), dtype=np.float32)}
    write_gguf_model(fixtures_dir / "base", tmp_path / "b.gguf", extra_tensors=odd)
    with pytest.raises(UnknownFormat, match="ffn_gate_exps"):
        GgufModel(tmp_path / "b.gguf")


def test_split_gguf_parts_are_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "m-00001-of-00002.gguf"), "llama")
    writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnknownFormat, match="llama-gguf-split"):
        GgufModel(tmp_path / "m-00001-of-00002.gguf")


# -- adapters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adapter_gguf_reads_back_with_gguf_reader(tmp_path: Path, dtype: torch.dtype) -> None:
    a = torch.randn(4, 32).to(dtype)
    b = torch.randn(16, 4).to(dtype)
    write_adapter_gguf(
        tmp_path / "a.gguf", "llama", 8.0, {"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b}
    )
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.0.attn_v.weight.lora_a"].shape) == [32, 4]  # ne: in, r
    assert list(tensors["blk.0.attn_v.weight.lora_b"].shape) == [4, 16]  # ne: r, out
    for name, expected in (("blk.0.attn_v.weight.lora_a", a), ("blk.0.attn_v.weight.lora_b", b)):
        t = tensors[name]
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(values.reshape(expected.shape), expected.float()), name


def test_an_adapter_gguf_is_not_a_model(tmp_path: Path) -> None:
    write_adapter_gguf(tmp_path / "a.gguf", "llama", 4.0, {"blk.0.attn_q.weight.lora_a": torch.ones(2, 8)})
    with pytest.raises(UnknownFormat, match="adapter"):
        GgufModel(tmp_path / "a.gguf")


def test_missing_gguf_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loratools.errors import MissingExtra

    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(MissingExtra, match=r"loratools\[gguf\]"):
        GgufModel(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [100, 3000])
def test_truncated_or_foreign_files_are_checkpoint_errors(
    fixtures_dir: Path, tmp_path: Path, keep: int
) -> None:
    from loratools.errors import CheckpointError

    write_gguf_model(fixtures_dir / "base", tmp_path / "m.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:keep])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    for name in ("cut.gguf", "junk.gguf"):
        with pytest.raises(CheckpointError, match="not a readable GGUF"):
            GgufModel(tmp_path / name)
