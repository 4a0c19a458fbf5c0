"""The built-in model against transformers (logits), and our adapters against PEFT's loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.errors import MissingKeys, UnknownFormat
from loratools.io.adapter_dir import save_adapter
from loratools.train.inject import inject_lora, lora_layers, to_adapter
from loratools.train.model import LlamaConfig, load_model
from tests.tolerances import TOL

transformers = pytest.importorskip("transformers")

LOGIT_TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32, different kernel orderings


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _hf(path: Path, cls: str = "AutoModelForCausalLM") -> torch.nn.Module:
    model = getattr(transformers, cls).from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("fixture", ["base", "base-sharded"])
def test_logits_match_transformers_llama(fixtures_dir: Path, fixture: str) -> None:
    ours = load_model(fixtures_dir / fixture).eval()
    hf = _hf(fixtures_dir / fixture, "LlamaForCausalLM")
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **LOGIT_TOL)


def test_bf16_loading_halves_memory_and_stays_close(fixtures_dir: Path) -> None:
    full = load_model(fixtures_dir / "base").eval()
    half = load_model(fixtures_dir / "base", dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = _ids(full.config.vocab_size)
    with torch.no_grad():
        reference, approx = full(ids), half(ids).float()
    # two bf16 layers: a few bf16 roundings per activation
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()


def _save_random(tmp_path: Path, config: object, cls: str) -> Path:
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    return tmp_path / "m"


TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def test_qwen2_biases_and_tied_embeddings_match(tmp_path: Path) -> None:
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1e6)
    path = _save_random(tmp_path, config, "Qwen2ForCausalLM")
    ours = load_model(path).eval()
    assert ours.config.qkv_bias and ours.model.layers[0].self_attn.q_proj.bias is not None
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _ids(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf(path)(ids).logits, **LOGIT_TOL)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_rope_scaling_matches(tmp_path: Path, scaling: dict) -> None:
    config = transformers.LlamaConfig(
        **TINY, head_dim=16, attention_bias=True, rope_scaling={**scaling, "rope_theta": 500000.0}
    )
    path = _save_random(tmp_path, config, "LlamaForCausalLM")
    ours = load_model(path).eval()
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(
        0, 96, (1, 200), generator=torch.Generator().manual_seed(3)
    )  # past the original context
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf(path)(ids).logits, **LOGIT_TOL)


def test_peft_reproduces_our_logits_from_a_saved_adapter(fixtures_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = load_model(fixtures_dir / "base").eval()
    inject_lora(ours, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    for layer in lora_layers(ours).values():  # a trained-looking update
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_adapter(
        to_adapter(ours, base_model="fixtures/base", targets=["q_proj", "v_proj", "down_proj"]),
        tmp_path / "a",
    )
    hf = peft.PeftModel.from_pretrained(
        _hf(fixtures_dir / "base", "LlamaForCausalLM"), str(tmp_path / "a")
    ).eval()
    ids = _ids(64)
    with torch.no_grad():
        ours_logits = ours(ids)
        torch.testing.assert_close(ours_logits, hf(ids).logits, **LOGIT_TOL)
        with hf.disable_adapter():
            base_logits = hf(ids).logits
    assert (ours_logits - base_logits).abs().max() > 0.1  # the adapter really changes the output


def test_gradient_checkpointing_gives_the_same_gradients(fixtures_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(fixtures_dir / "base")
        inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, init="gaussian")
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        model(_ids(64)).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # the recomputed forward: the same float32 ops
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_mismatched_checkpoints_are_refused(fixtures_dir: Path, fixture_copy) -> None:
    folder = fixture_copy("base")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(MissingKeys, match=r"missing model\.layers\.2"):
        load_model(folder)
    with pytest.raises(UnknownFormat, match="gpt2"):
        LlamaConfig.from_dict({**config, "model_type": "gpt2"})
    with pytest.raises(UnknownFormat, match="yarn"):
        LlamaConfig.from_dict({**config, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _plain_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("chunk_bytes", [64 * 4 * 5, 32 << 20])  # 5-row chunks, and one chunk
def test_fused_head_loss_equals_cross_entropy_of_the_logits(
    fixtures_dir: Path, monkeypatch, chunk_bytes: int
):
    from loratools.train import loss

    monkeypatch.setattr(loss, "CHUNK_BYTES", chunk_bytes)
    model = load_model(fixtures_dir / "base")
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, init="gaussian")
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    ids = _ids(64)
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt: no loss there
    results = []
    for compute in (lambda: model(ids, labels), lambda: _plain_loss(model, ids, labels)):
        model.zero_grad()
        value = compute()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, **TOL[torch.float32])
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert model(ids, torch.full_like(ids, -100)).item() == 0.0


def test_a_trainable_head_takes_the_plain_path(fixtures_dir: Path) -> None:
    model = load_model(fixtures_dir / "base")
    inject_lora(model, ["lm_head"], rank=2, alpha=4)
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids), _plain_loss(model, ids, ids), **TOL[torch.float32])
