"""Embedding LoRA: PEFT's transposed ``lora_embedding_A/B`` in and out, and every command on it.

PEFT is the judge where it is installed (slow tests: importing it costs ~10 s): a PEFT adapter on
the fixture Llama with ``embed_tokens`` targeted merges to exactly PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools.adapter import Adapter, LoraWeight
from loratools.commands.merge import merge_paths
from loratools.errors import LoratoolsError, UnknownFormat
from loratools.formats import LoadContext, peft
from loratools.formats import gguf as gguf_names
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.kinds import embedding
from loratools.ops.combine import CombineOptions, combine_adapters
from loratools.ops.resize import ResizeOptions, resize_adapter
from loratools.ops.spectrum import adapter_spectrum
from tests.llama_cpp import LLAMA_BIN
from tests.ops.test_merge import read_all
from tests.tolerances import LOGITS_FP32, TOL

EMBED = "model.embed_tokens"
Q0 = "model.layers.0.self_attn.q_proj"
VOCAB, DIM = 64, 32  # the fixture Llama's embedding (fixtures/make_fixtures.py)


def peft_embedding_factors(seed: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-layout factors: lora_embedding_A (r, vocab), lora_embedding_B (dim, r)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, VOCAB, generator=gen) * 0.3, torch.randn(DIM, rank, generator=gen) * 0.3


def embedding_adapter(seed: int = 0, alpha: float = 8.0, rslora: bool = False, **kwargs) -> Adapter:
    a_peft, b_peft = peft_embedding_factors(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    q = LoraWeight(torch.randn(4, DIM, generator=gen) * 0.1, torch.randn(DIM, 4, generator=gen) * 0.1, 4.0)
    weights = {EMBED: embedding.from_peft(a_peft, b_peft, alpha, rslora), Q0: q}
    return Adapter(weights, base_model="fixtures/base", **kwargs)


# -- the layout ---------------------------------------------------------------------------------
def extract_embedding_lora(base: Path, finetuned: Path, out: Path):
    """``extract -r 4 --embeddings lora`` of the pair, saved to ``out`` (PEFT folder); the result."""
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.extract import ExtractOptions, extract

    result = extract(
        open_checkpoint(base), open_checkpoint(finetuned), ExtractOptions(rank=4, embeddings="lora")
    )
    assert result is not None
    save_adapter(result.adapter, out)
    return result


def test_peft_layout_gives_peft_delta_in_the_embedding_layout() -> None:
    a_peft, b_peft = peft_embedding_factors(1)
    weight = embedding.from_peft(a_peft, b_peft, alpha=6.0, use_rslora=True)
    scale = 6.0 / 2.0  # rsLoRA: alpha / sqrt(4)
    # peft/tuners/lora/layer.py Embedding.get_delta_weight: transpose(B @ A) * scaling
    expected = (b_peft @ a_peft).T * scale  # (vocab, dim)
    assert weight.shape == (VOCAB, DIM) and weight.embedding
    torch.testing.assert_close(weight.delta(), expected, **TOL[torch.float32])
    back_a, back_b = embedding.to_peft(weight)
    assert torch.equal(back_a, a_peft) and torch.equal(back_b, b_peft)


def test_peft_keys_round_trip_byte_exact_with_base_layer_copies() -> None:
    a_peft, b_peft = peft_embedding_factors(2)
    base_copy = torch.randn(VOCAB, DIM)
    tensors = {
        f"base_model.model.{EMBED}.lora_embedding_A": a_peft,
        f"base_model.model.{EMBED}.lora_embedding_B": b_peft,
        f"base_model.model.{EMBED}.base_layer.weight": base_copy,  # PEFT's save_embedding_layers
        "base_model.model.lm_head.weight": torch.randn(VOCAB, DIM),  # modules_to_save
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]}
    adapter = peft.to_adapter(tensors, context=LoadContext(config=config))
    assert adapter.weights[EMBED].embedding
    assert set(adapter.saved_modules) == {f"{EMBED}.weight", "lm_head.weight"}  # the copy replaces the base
    out, _, out_config = peft.from_adapter(adapter)
    assert set(out) == set(tensors)
    assert all(torch.equal(out[k], t) for k, t in tensors.items())
    assert out_config["modules_to_save"] == ["lm_head"]  # not embed_tokens: it is LoRA-wrapped


def test_merge_adds_the_embedding_delta_unchanged_by_fan_in_fan_out(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    # fan_in_fan_out transposes Conv1D deltas; an embedding keeps (vocab, dim) either way
    for fan_in_fan_out in (False, True):
        adapter = embedding_adapter(3, fan_in_fan_out=fan_in_fan_out)
        adapter = replace(adapter, weights={EMBED: adapter.weights[EMBED]})
        save_adapter(adapter, tmp_path / f"a{fan_in_fan_out}")
        merge_paths(
            str(fixtures_dir / "base"),
            tmp_path / f"m{fan_in_fan_out}",
            add=[(str(tmp_path / f"a{fan_in_fan_out}"), 1.0)],
        )
        base, merged = read_all(fixtures_dir / "base"), read_all(tmp_path / f"m{fan_in_fan_out}")
        expected = base[f"{EMBED}.weight"] + adapter.weights[EMBED].delta()
        torch.testing.assert_close(merged[f"{EMBED}.weight"], expected, **TOL[torch.float32])
        assert adapter.delta(EMBED).shape == (VOCAB, DIM)


def test_unmerge_of_merge_restores_the_embedding(fixtures_dir: Path, tmp_path: Path) -> None:
    save_adapter(embedding_adapter(4), tmp_path / "a")
    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    merge_paths(str(tmp_path / "m"), tmp_path / "u", remove=[(str(tmp_path / "a"), 1.0)])
    base, merged, back = (read_all(p) for p in (fixtures_dir / "base", tmp_path / "m", tmp_path / "u"))
    assert not torch.allclose(merged[f"{EMBED}.weight"], base[f"{EMBED}.weight"])
    # one float32 rounding each way on entries of size ~1 (the embedding's std)
    torch.testing.assert_close(back[f"{EMBED}.weight"], base[f"{EMBED}.weight"], rtol=0, atol=1e-6)


def test_spectrum_combine_and_resize_keep_the_embedding(tmp_path: Path) -> None:
    first, second = embedding_adapter(5), embedding_adapter(6)
    delta = first.weights[EMBED].delta() + second.weights[EMBED].delta()  # (vocab, dim)

    report = adapter_spectrum(first)
    module = next(m for m in report.modules if m.name == EMBED)
    expected = torch.linalg.svdvals(first.weights[EMBED].delta())[:4]
    got = torch.as_tensor(module.singular_values, dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # two float32 SVD routes

    combined = combine_adapters([first, second], CombineOptions()).adapter
    assert combined.weights[EMBED].embedding and not combined.weights[Q0].embedding
    torch.testing.assert_close(combined.weights[EMBED].delta(), delta, **TOL[torch.float32])

    resized = resize_adapter(combined, ResizeOptions(rank=3)).adapter
    weight = resized.weights[EMBED]
    assert weight.embedding and weight.rank == 3
    s = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(delta - weight.delta())
    assert error <= s[3:].square().sum().sqrt() * (1 + 1e-4)  # Eckart–Young: the optimal rank-3 error

    save_adapter(resized, tmp_path / "r")
    keys = load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert keys[f"base_model.model.{EMBED}.lora_embedding_A"].shape == (3, VOCAB)
    assert keys[f"base_model.model.{EMBED}.lora_embedding_B"].shape == (DIM, 3)
    assert load_adapter(tmp_path / "r").weights[EMBED].embedding


def test_gguf_token_embd_is_flipped_as_llama_cpp_reads_it() -> None:
    adapter = embedding_adapter(7, alpha=3.0, rslora=True)  # a scale llama.cpp's alpha/r cannot express
    base_of = {m: f"{m}.weight" for m in adapter.weights}
    alpha, tensors = gguf_names.adapter_tensors(adapter, base_of, gguf_names.ARCHITECTURES["llama"], 4, 2)
    lora_a, lora_b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    # llama-adapter.cpp: token_embd ne[0]=dim equals lora_b ne[1], ne[1]=vocab equals lora_a ne[1]
    # (GGUF's ne is the torch shape reversed), and the rank is lora_b's ne[0]
    assert lora_a.shape == (VOCAB, 4) and lora_b.shape == (DIM, 4)
    ids = torch.tensor([0, 5, 63])
    # llm_build_inp_embd: delta rows = alpha / r · lora_b @ get_rows(lora_a, ids)
    rows = (alpha / lora_b.shape[1] * lora_b @ lora_a[ids].T).T  # (ids, dim)
    torch.testing.assert_close(rows, adapter.weights[EMBED].delta()[ids], **TOL[torch.float32])


def test_kohya_refuses_embedding_lora_by_name(run_cli, tmp_path: Path) -> None:
    save_adapter(embedding_adapter(8), tmp_path / "a")
    result = run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 1
    assert "model.embed_tokens" in result.stderr and "embedding LoRA" in result.stderr
    assert not (tmp_path / "k.safetensors").exists()
    with pytest.raises(UnknownFormat, match="embed_tokens"):
        embedding.refuse_embeddings(embedding_adapter(8).weights, "kohya")


# -- PEFT as the judge --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_embedding_dir(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """A PEFT adapter with embed_tokens (Embedding LoRA), q_proj and lm_head, random factors."""
    from peft import LoraConfig, get_peft_model

    from tests.peft_helpers import load_llama

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"],
        rank_pattern={"embed_tokens": 2}, alpha_pattern={"embed_tokens": 5}, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(load_llama(fixtures_dir / "base"), config)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "setting save_embedding_layers to True"
        model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_merge_equals_peft_merge_and_unload(
    peft_embedding_dir: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from tests.peft_helpers import load_llama, logits, tokens

    reference = PeftModel.from_pretrained(load_llama(fixtures_dir / "base"), peft_embedding_dir)
    ids = tokens()
    expected = logits(reference, ids)
    reference_state = reference.merge_and_unload().state_dict()

    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(peft_embedding_dir), 1.0)])
    ours = read_all(tmp_path / "m")
    base = read_all(fixtures_dir / "base")
    changed = sorted(n for n in ours if not torch.equal(ours[n], base[n]))
    assert changed == [
        "lm_head.weight",
        f"{EMBED}.weight",
        f"{Q0}.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference_state[name], **TOL[torch.float32])
    torch.testing.assert_close(logits(load_llama(tmp_path / "m"), ids), expected, **LOGITS_FP32)


@pytest.mark.slow
def test_our_rewrite_is_byte_identical_and_loads_in_peft(
    peft_embedding_dir: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    from tests.peft_helpers import logits_through_peft, tokens

    adapter = load_adapter(peft_embedding_dir)
    assert adapter.weights[EMBED].embedding and adapter.weights[EMBED].rank == 2
    save_adapter(adapter, tmp_path / "ours")
    theirs = load_file(peft_embedding_dir / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {EMBED: 2} and config["alpha_pattern"] == {EMBED: 5}

    # without the base-layer copies, PEFT still loads every factor (no "missing adapter keys")
    save_adapter(replace(adapter, saved_modules={}), tmp_path / "lean")
    ids = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits_through_peft(fixtures_dir / "base", tmp_path / "lean", ids)
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    expected = logits_through_peft(fixtures_dir / "base", peft_embedding_dir, ids)
    torch.testing.assert_close(got, expected, **LOGITS_FP32)


# -- extract --embeddings -----------------------------------------------------------------------
def planted_finetune(base_dir: Path, out: Path, modules: list[str], rank: int = 3, seed: int = 11) -> Path:
    """``base_dir`` + a rank-``rank`` ΔW on each named tensor, written to ``out`` (with config.json)."""
    import shutil

    from loratools.io.checkpoint import open_checkpoint
    from tests.ops.test_merge import write_checkpoint

    ckpt = open_checkpoint(base_dir)
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    gen = torch.Generator().manual_seed(seed)
    for name in modules:
        d, k = tensors[name].shape
        tensors[name] = (
            tensors[name] + torch.randn(d, rank, generator=gen) @ torch.randn(rank, k, generator=gen) * 0.1
        )
    write_checkpoint(out, tensors)
    shutil.copy(base_dir / "config.json", out / "config.json")
    return out


@pytest.fixture
def embedding_finetune(fixtures_dir: Path, tmp_path: Path) -> Path:
    return planted_finetune(
        fixtures_dir / "base", tmp_path / "ft", [f"{EMBED}.weight", "lm_head.weight", f"{Q0}.weight"]
    )


def test_extract_embeddings_skip_full_or_lora(fixtures_dir: Path, embedding_finetune: Path) -> None:
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.extract import ExtractOptions, extract

    def run(mode: str):
        base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(embedding_finetune)
        return extract(base, ft, ExtractOptions(rank=4, embeddings=mode))  # type: ignore[arg-type]

    skipped = run("skip")
    assert set(skipped.adapter.weights) == {Q0}
    assert "--embeddings" in skipped.skipped[f"{EMBED}.weight"] and "lm_head.weight" in skipped.skipped
    full = run("full")
    assert set(full.saved) == {f"{EMBED}.weight", "lm_head.weight"}
    lora = run("lora")
    assert set(lora.adapter.weights) == {EMBED, "lm_head", Q0} and not lora.saved and not lora.skipped
    assert lora.adapter.weights[EMBED].embedding and not lora.adapter.weights["lm_head"].embedding
    errors = {m.name: m.relative_error for m in lora.modules}
    assert max(errors.values()) < 1e-5  # rank-3 ΔW at rank 4: exact up to float32 rounding
    assert lora.summary()["tied_embeddings"] == []
    with pytest.raises(LoratoolsError, match="--include-embeddings"):
        ExtractOptions(rank=4, embeddings="lora", include_embeddings=True)


@pytest.mark.slow
def test_extracted_embedding_lora_gives_the_finetune_in_peft_and_merged(
    fixtures_dir: Path, embedding_finetune: Path, tmp_path: Path
) -> None:
    from tests.peft_helpers import load_llama, logits, logits_through_peft, tokens

    extract_embedding_lora(fixtures_dir / "base", embedding_finetune, tmp_path / "a")
    ids = tokens()
    expected = logits(load_llama(embedding_finetune), ids)
    torch.testing.assert_close(
        logits_through_peft(fixtures_dir / "base", tmp_path / "a", ids), expected, **LOGITS_FP32
    )
    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    torch.testing.assert_close(logits(load_llama(tmp_path / "m"), ids), expected, **LOGITS_FP32)


@pytest.mark.slow
def test_tied_embeddings_are_reported_and_tied_in_peft(fixtures_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.extract import ExtractOptions, extract
    from tests.peft_helpers import load_llama, logits, logits_through_peft, tokens

    settings = json.loads((fixtures_dir / "base" / "config.json").read_text())
    settings.pop("architectures")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, "tie_word_embeddings": True}))
    model.save_pretrained(tmp_path / "base")  # one matrix: no lm_head.weight in the file
    ft = planted_finetune(tmp_path / "base", tmp_path / "ft", [f"{EMBED}.weight"])

    result = extract(
        open_checkpoint(tmp_path / "base"), open_checkpoint(ft), ExtractOptions(rank=4, embeddings="lora")
    )
    assert result.summary()["tied_embeddings"] == [EMBED]
    assert result.adapter.extra_config["ensure_weight_tying"] is True
    save_adapter(result.adapter, tmp_path / "a")
    ids = tokens()
    expected = logits(load_llama(ft), ids)  # the tied fine-tune: input and output side both changed
    torch.testing.assert_close(
        logits_through_peft(tmp_path / "base", tmp_path / "a", ids), expected, **LOGITS_FP32
    )
    merge_paths(str(tmp_path / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    torch.testing.assert_close(logits(load_llama(tmp_path / "m"), ids), expected, **LOGITS_FP32)


# -- added tokens: a grown vocabulary -----------------------------------------------------------
NEW_TOKENS = 2


@pytest.fixture
def grown_finetune(fixtures_dir: Path, tmp_path: Path) -> Path:
    """The fixture Llama fine-tuned with 2 added tokens: embedding and lm_head (66, 32), every old
    row changed by a rank-3 ΔW, q_proj changed too; config vocab_size 66, its own tokenizer file."""
    from loratools.io.checkpoint import open_checkpoint
    from tests.ops.test_merge import write_checkpoint

    ckpt = open_checkpoint(fixtures_dir / "base")
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    gen = torch.Generator().manual_seed(21)
    for name in (f"{EMBED}.weight", "lm_head.weight", f"{Q0}.weight"):
        d, k = tensors[name].shape
        tensors[name] = (
            tensors[name] + torch.randn(d, 3, generator=gen) @ torch.randn(3, k, generator=gen) * 0.1
        )
    for name in (f"{EMBED}.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.randn(NEW_TOKENS, DIM, generator=gen) * 0.3])
    out = write_checkpoint(tmp_path / "grown", tensors)
    config = json.loads((fixtures_dir / "base" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB + NEW_TOKENS}))
    (out / "tokenizer.json").write_text('{"added_tokens": [{"id": 64}, {"id": 65}]}')
    return out


def test_grown_vocabulary_extracts_and_merges_back_grown(
    run_cli, fixtures_dir: Path, grown_finetune: Path, tmp_path: Path
) -> None:
    result = extract_embedding_lora(fixtures_dir / "base", grown_finetune, tmp_path / "a")
    # no LoRA fits a (64, 32) base and a (66, 32) fine-tune: the two matrices are carried whole
    assert set(result.saved) == {f"{EMBED}.weight", "lm_head.weight"} and set(result.adapter.weights) == {Q0}

    args = (
        "merge",
        fixtures_dir / "base",
        tmp_path / "a",
        "-o",
        tmp_path / "m",
        "--tokenizer",
        grown_finetune,
    )
    merged = run_cli(*args, "--json")
    assert merged.exit_code == 0, merged.output
    assert any("grown from 64 to 66" in w for w in json.loads(merged.stdout)["warnings"])
    ours, wanted = read_all(tmp_path / "m"), read_all(grown_finetune)
    assert ours[f"{EMBED}.weight"].shape == (VOCAB + NEW_TOKENS, DIM)
    for name, tensor in wanted.items():  # rank-3 changes at rank 4 and whole copies: float32 rounding
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == VOCAB + NEW_TOKENS
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (
        grown_finetune / "tokenizer.json"
    ).read_bytes()

    # other shape changes stay errors, and a grown tensor cannot be removed again
    back = run_cli("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "u")
    assert back.exit_code == 1 and "lm_head.weight" in back.stderr and not (tmp_path / "u").exists()


@pytest.mark.slow
def test_grown_vocabulary_round_trip_gives_the_finetune_logits_merged_and_in_peft(
    fixtures_dir: Path, grown_finetune: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from tests.peft_helpers import load_llama, logits

    extract_embedding_lora(fixtures_dir / "base", grown_finetune, tmp_path / "a")
    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    ids = torch.randint(0, VOCAB + NEW_TOKENS, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = VOCAB  # the added tokens appear
    ids[:, 1] = VOCAB + 1
    expected = logits(load_llama(grown_finetune), ids)
    torch.testing.assert_close(logits(load_llama(tmp_path / "m"), ids), expected, **LOGITS_FP32)

    model = load_llama(fixtures_dir / "base")
    model.resize_token_embeddings(VOCAB + NEW_TOKENS)  # what PEFT needs before loading modules_to_save
    peft_model = PeftModel.from_pretrained(model, tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, **LOGITS_FP32)


def test_grown_merge_into_a_sharded_base_rewrites_the_index_size(
    fixtures_dir: Path, grown_finetune: Path, tmp_path: Path
) -> None:
    extract_embedding_lora(fixtures_dir / "base", grown_finetune, tmp_path / "a")
    merge_paths(str(fixtures_dir / "base-sharded"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    merged = read_all(tmp_path / "m")
    assert merged["lm_head.weight"].shape == (VOCAB + NEW_TOKENS, DIM)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())


# -- llama.cpp as the judge of the token_embd layout --------------------------------------------


@pytest.mark.skipif(
    not (LLAMA_BIN / "llama-export-lora").is_file(), reason="no llama.cpp build in ../shared/tools"
)
def test_llama_cpp_merges_our_token_embd_lora_to_the_same_embedding(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    import subprocess

    import gguf
    import numpy as np

    from tests.io.test_gguf_io import write_gguf_model

    originals = write_gguf_model(fixtures_dir / "base", tmp_path / "f32.gguf", qtype="F32", bpe_vocab=True)
    adapter = embedding_adapter(7, alpha=3.0, rslora=True)  # a scale folded into lora_b
    save_adapter(adapter, tmp_path / "a")
    args = (
        "convert",
        tmp_path / "a",
        "--to",
        "gguf",
        "--base",
        tmp_path / "f32.gguf",
        "-o",
        tmp_path / "a.gguf",
    )
    assert run_cli(*args).exit_code == 0
    command = [
        str(LLAMA_BIN / "llama-export-lora"),
        "-m",
        str(tmp_path / "f32.gguf"),
        "--lora",
        str(tmp_path / "a.gguf"),
    ]
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "m.gguf"), "-t", "2"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    merged = torch.from_numpy(np.array(tensors["token_embd.weight"].data)).float().reshape(VOCAB, DIM)
    expected = originals[f"{EMBED}.weight"] + adapter.weights[EMBED].delta()
    # llama.cpp sums in float32 in its own order; entries are O(1)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_a_bare_peft_file_with_only_embedding_lora_is_detected(fixtures_dir: Path, tmp_path: Path) -> None:
    adapter = embedding_adapter(9)
    save_adapter(replace(adapter, weights={EMBED: adapter.weights[EMBED]}), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"  # the file alone, no adapter_config.json
    loaded = load_adapter(weights)
    assert loaded.weights[EMBED].embedding
    torch.testing.assert_close(
        loaded.weights[EMBED].delta(), adapter.weights[EMBED].delta(), **TOL[torch.float32]
    )


def test_unmerge_and_swap_of_adapters_with_peft_base_layer_copies(fixtures_dir: Path, tmp_path: Path) -> None:
    """PEFT saves ``embed_tokens.base_layer.weight`` beside an embedding LoRA; removing the adapter
    restores that copy (the base) instead of refusing."""
    base = read_all(fixtures_dir / "base")
    for seed, name in ((10, "a"), (11, "b")):
        adapter = embedding_adapter(seed)
        copy = {
            f"{EMBED}.weight": base[f"{EMBED}.weight"].clone()
        }  # what PEFT's save_embedding_layers writes
        save_adapter(replace(adapter, saved_modules=copy), tmp_path / name)
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert f"base_model.model.{EMBED}.base_layer.weight" in keys

    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    merge_paths(str(tmp_path / "m"), tmp_path / "u", remove=[(str(tmp_path / "a"), 1.0)])
    assert torch.equal(
        read_all(tmp_path / "u")[f"{EMBED}.weight"], base[f"{EMBED}.weight"]
    )  # the copy itself

    merge_paths(
        str(tmp_path / "m"),
        tmp_path / "s",
        add=[(str(tmp_path / "b"), 1.0)],
        remove=[(str(tmp_path / "a"), 1.0)],
    )
    expected = base[f"{EMBED}.weight"] + embedding_adapter(11).weights[EMBED].delta()
    torch.testing.assert_close(read_all(tmp_path / "s")[f"{EMBED}.weight"], expected, **TOL[torch.float32])


def test_grown_vocabulary_round_trip_is_within_the_rank_r_error(fixtures_dir: Path, tmp_path: Path) -> None:
    """A rank-6 change at rank 4: the merged weight misses the fine-tune by exactly the Eckart–Young
    tail √(σ₅² + σ₆²); the grown embedding and lm_head come back bit for bit."""
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.extract import ExtractOptions, extract
    from tests.ops.test_merge import write_checkpoint

    base = read_all(fixtures_dir / "base")
    tensors = dict(base)
    gen = torch.Generator().manual_seed(31)
    tensors[f"{Q0}.weight"] = (
        base[f"{Q0}.weight"] + torch.randn(DIM, 6, generator=gen) @ torch.randn(6, DIM, generator=gen) * 0.1
    )
    for name in (f"{EMBED}.weight", "lm_head.weight"):
        tensors[name] = torch.cat([base[name], torch.randn(NEW_TOKENS, DIM, generator=gen)])
    write_checkpoint(tmp_path / "ft", tensors)

    result = extract(
        open_checkpoint(fixtures_dir / "base"),
        open_checkpoint(tmp_path / "ft"),
        ExtractOptions(rank=4, exact=True, embeddings="lora"),
    )
    save_adapter(result.adapter, tmp_path / "a")
    merge_paths(str(fixtures_dir / "base"), tmp_path / "m", add=[(str(tmp_path / "a"), 1.0)])
    merged = read_all(tmp_path / "m")
    for name in (f"{EMBED}.weight", "lm_head.weight"):
        assert torch.equal(merged[name], tensors[name])  # carried whole: the same bytes
    delta = (tensors[f"{Q0}.weight"] - base[f"{Q0}.weight"]).double()
    tail = float(torch.linalg.svdvals(delta)[4:].square().sum().sqrt())
    error = float(
        torch.linalg.matrix_norm(merged[f"{Q0}.weight"].double() - tensors[f"{Q0}.weight"].double())
    )
    assert abs(error - tail) <= 1e-4 * tail + 1e-6  # float32 factors and one float32 rounding of W
