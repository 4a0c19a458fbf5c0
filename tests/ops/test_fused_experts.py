"""Fused 3-D expert tensors (PEFT ``target_parameters``): PEFT is the judge.

Two tiny transformers MoEs built from configs (random weights): gpt-oss, whose fused experts are
(E, in, out) (``is_transposed``), and Qwen3-MoE, whose in-memory experts are (E, out, in). PEFT
wraps ``gate_up_proj`` and ``down_proj`` with random (non-zero) factors; loratools' per-expert
LoRAs must give PEFT's ``get_delta_weight``, its ``merge_and_unload`` and its logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.errors import LoratoolsError, ShapeMismatch
from loratools.kinds.fused import FusedParam, from_peft, fused_name, merge_fused, resolve_wrappers, to_peft
from loratools.ops.spectrum import adapter_spectrum
from tests._tolerances import LOGITS_FP32, TOL

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PARAMS = ("gate_up_proj", "down_proj")  # registration order in both models
EXPERTS_MODULE = "model.layers.0.mlp.experts"
# the tiny gpt-oss: 2 fused parameters × 3 experts, all touched by its adapters, no router changed
ALL_EXPERTS_TOUCHED = {"base": 6, "experts": 3, "touched": 6, "dropped": [], "routers": []}


def _gpt_oss(intermediate: int = 12) -> torch.nn.Module:
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=3, num_experts_per_tok=2,
        layer_types=["full_attention"],
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config).eval()


def _qwen3_moe() -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config).eval()


MODELS = {"gpt_oss": (_gpt_oss, True), "qwen3_moe": (_qwen3_moe, False)}


def _peft_model(make: Any, use_rslora: bool = False) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The base model's state (cloned) and a PEFT model with random factors on both fused params."""
    model = make()
    with torch.no_grad():  # random init leaves the (E, ·, ·) experts empty in some versions
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=[], target_parameters=[f"mlp.experts.{p}" for p in PARAMS],
        init_lora_weights=False, use_rslora=use_rslora,
    )  # fmt: skip
    return peft.get_peft_model(model, config), base


def _wrappers(model: torch.nn.Module) -> list[Any]:
    """PEFT's ParamWrappers on the experts module, outermost first."""
    layer = model.get_submodule(f"base_model.model.{EXPERTS_MODULE}")
    found = []
    while isinstance(layer, peft.tuners.lora.layer.ParamWrapper):
        found.append(layer)
        layer = layer.base_layer
    return found


def _our_weights(
    model: torch.nn.Module, base: dict[str, torch.Tensor], rslora: bool
) -> dict[str, LoraWeight]:
    """What loratools reads: resolve the wrappers against the base shapes, split per expert."""
    state = {k: v.detach() for k, v in peft.get_peft_model_state_dict(model).items()}
    prefix = f"base_model.model.{EXPERTS_MODULE}"
    pairs = []
    for depth in range(len(PARAMS)):
        key = prefix + ".base_layer" * depth
        pairs.append((state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]))
    shapes = [(f"{EXPERTS_MODULE}.{p}", tuple(base[f"{EXPERTS_MODULE}.{p}"].shape)) for p in PARAMS]
    weights: dict[str, LoraWeight] = {}
    for (a, b), param in zip(pairs, resolve_wrappers(pairs, shapes), strict=True):  # type: ignore[arg-type]
        weights.update(from_peft(a, b, param, alpha=5.0, use_rslora=rslora))
    return weights


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rslora", [False, True])
def test_per_expert_delta_is_peft_get_delta_weight(name: str, rslora: bool) -> None:
    make, transposed = MODELS[name]
    model, base = _peft_model(make, rslora)
    weights = _our_weights(model, base, rslora)
    wrappers = _wrappers(model)
    assert [w.parameter_name for w in wrappers] == ["down_proj", "gate_up_proj"]  # last registered outermost
    for wrapper in wrappers:
        param = f"{EXPERTS_MODULE}.{wrapper.parameter_name}"
        expected = wrapper.get_delta_weight("default").float()  # (E, p, q)
        for e in range(expected.shape[0]):
            # float32 products of rank-2 factors: one rounding per term
            torch.testing.assert_close(
                weights[fused_name(param, e)].delta(), expected[e], **TOL[torch.float32]
            )
    assert len(weights) == 2 * base[f"{EXPERTS_MODULE}.gate_up_proj"].shape[0]
    assert (
        getattr(wrappers[-1].get_base_layer(), "is_transposed", False) == transposed
    )  # both layouts covered


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_equals_peft_merge_and_unload(name: str) -> None:
    make, _ = MODELS[name]
    model, base = _peft_model(make)
    weights = _our_weights(model, base, False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapter_logits = model(ids).logits
        merged_model = model.merge_and_unload()
        peft_logits = merged_model(ids).logits
    peft_state = merged_model.state_dict()
    ours = dict(base)
    for p in PARAMS:
        key = f"{EXPERTS_MODULE}.{p}"
        ours[key] = merge_fused(base[key], weights, key)
        # W + s·B·A in float32 both ways, summed in a different order: TOL[float32]
        torch.testing.assert_close(ours[key], peft_state[key], **TOL[torch.float32])
        assert not torch.allclose(ours[key], base[key])  # the delta is really there
    fresh = make()
    fresh.load_state_dict(ours)
    with torch.no_grad():
        our_logits = fresh(ids).logits
    torch.testing.assert_close(our_logits, peft_logits, **LOGITS_FP32)
    torch.testing.assert_close(our_logits, adapter_logits, **LOGITS_FP32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_written_back_loads_in_peft_with_equal_logits(name: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    make, transposed = MODELS[name]
    model, base = _peft_model(make)
    weights = _our_weights(model, base, False)
    original = {k: v.detach() for k, v in peft.get_peft_model_state_dict(model).items()}
    tensors = {}
    for depth, p in enumerate(reversed(PARAMS)):  # outermost wrapper = last registered parameter
        key = f"{EXPERTS_MODULE}.{p}"
        a, b = to_peft(weights, FusedParam(key, tuple(base[key].shape), transposed))  # type: ignore[arg-type]
        prefix = f"base_model.model.{EXPERTS_MODULE}" + ".base_layer" * depth
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        # the split and the join only move values: the same bytes come back
        assert torch.equal(a, original[f"{prefix}.lora_A.weight"])
        assert torch.equal(b, original[f"{prefix}.lora_B.weight"])
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 5, "target_modules": [], "bias": "none",
        "target_parameters": [f"mlp.experts.{p}" for p in PARAMS], "lora_dropout": 0.0,
    }  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 64, (2, 7))
    fresh = make()
    fresh.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **LOGITS_FP32)


def test_spectrum_per_expert_is_the_slice_spectrum() -> None:
    model, base = _peft_model(_gpt_oss)
    weights = _our_weights(model, base, False)
    report = adapter_spectrum(Adapter(weights))
    expected = {}
    for wrapper in _wrappers(model):
        delta = wrapper.get_delta_weight("default").double()
        for e in range(delta.shape[0]):
            expected[fused_name(f"{EXPERTS_MODULE}.{wrapper.parameter_name}", e)] = torch.linalg.svdvals(
                delta[e]
            )[:2]
    assert {m.name for m in report.modules} == set(expected)
    for module in report.modules:
        # rank-2 float32 factors: singular values to float32 relative precision (1e-5 slack)
        torch.testing.assert_close(
            module.singular_values.double(), expected[module.name], rtol=1e-5, atol=1e-6
        )


def test_resolve_wrappers_by_shape_and_refusals() -> None:
    gen = torch.Generator().manual_seed(1)
    a_gu, b_gu = (
        torch.randn(6, 16, generator=gen),
        torch.randn(24, 6, generator=gen),
    )  # gpt-oss gate_up (3,16,24)
    a_d, b_d = torch.randn(6, 12, generator=gen), torch.randn(16, 6, generator=gen)  # down (3,12,16)
    params = [("x.gate_up_proj", (3, 16, 24)), ("x.down_proj", (3, 12, 16))]
    # outermost first, and also given in the other order: shapes decide
    got = resolve_wrappers([(a_d, b_d), (a_gu, b_gu)], params)
    assert [(p.name, p.transposed) for p in got] == [("x.down_proj", True), ("x.gate_up_proj", True)]
    got = resolve_wrappers([(a_gu, b_gu), (a_d, b_d)], params)
    assert [p.name for p in got] == ["x.gate_up_proj", "x.down_proj"]
    square = [("x.down_proj", (3, 16, 16))]
    a_sq, b_sq = torch.randn(6, 16, generator=gen), torch.randn(16, 6, generator=gen)
    with pytest.raises(ShapeMismatch, match="square slice"):
        resolve_wrappers([(a_sq, b_sq)], square)
    assert resolve_wrappers([(a_sq, b_sq)], square, transposed=True)[0].transposed
    with pytest.raises(ShapeMismatch, match="fit none"):
        resolve_wrappers([(a_gu, b_gu)], [("x.down_proj", (3, 12, 16))])


def test_to_peft_refuses_mixed_ranks_and_missing_experts() -> None:
    param = FusedParam("x.down_proj", (2, 4, 3), transposed=False)
    one = LoraWeight(torch.randn(2, 3), torch.randn(4, 2), 2.0)
    other = LoraWeight(torch.randn(1, 3), torch.randn(4, 1), 2.0)
    with pytest.raises(ShapeMismatch, match="one rank"):
        to_peft({"x.down_proj[0]": one, "x.down_proj[1]": other}, param)
    with pytest.raises(ShapeMismatch, match="missing"):
        to_peft({"x.down_proj[0]": one}, param)


def _saved(tmp_path: Path, make: Any = _gpt_oss) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny gpt-oss base folder and a PEFT target_parameters adapter folder written by PEFT."""
    model, base = _peft_model(make)
    fresh = make()
    fresh.load_state_dict(base)
    fresh.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


def test_merge_command_path_equals_peft_logits(tmp_path: Path) -> None:
    from loratools.commands.merge import merge_paths
    from loratools.io.adapter_dir import load_adapter

    base, adapter, model = _saved(tmp_path)
    with pytest.raises(LoratoolsError, match="needs the base model"):
        load_adapter(adapter)
    report = merge_paths(str(base), tmp_path / "merged", add=[(str(adapter), 1.0)])
    assert report.to_dict()["merged"] == 2
    # every expert slice counted: 2 fused tensors × 3 experts in the base, all 6 touched
    assert report.to_dict()["experts"] == ALL_EXPERTS_TOUCHED
    merged = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 64, (2, 7))
    plain = transformers.GptOssForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, **LOGITS_FP32)
        assert (plain(ids).logits - model(ids).logits).abs().max() > 1e-2  # the experts' delta shows
    records = {m.name: m for m in report.modules}  # one precision record per fused tensor
    assert set(records) == {f"{EXPERTS_MODULE}.gate_up_proj", f"{EXPERTS_MODULE}.down_proj"}
    assert all(r.adapters == 3 and r.delta_norm > 0 for r in records.values())  # 3 experts each


def test_read_then_written_by_loratools_loads_in_peft(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from loratools.io.adapter_dir import load_adapter, save_adapter
    from loratools.io.checkpoint import open_checkpoint

    base, adapter_dir, model = _saved(tmp_path)
    shapes = {info.name: tuple(info.shape) for info in open_checkpoint(base).infos()}
    adapter = load_adapter(adapter_dir, base_shapes=shapes)
    assert len(adapter.weights) == 2 * 3  # (gate_up_proj, down_proj) × 3 experts
    out = save_adapter(adapter, tmp_path / "written")
    original = load_file(adapter_dir / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    assert set(written) == set(original)
    assert all(torch.equal(written[k], original[k]) for k in original)  # values only moved: same bytes
    fresh = transformers.GptOssForCausalLM.from_pretrained(base).eval()
    loaded = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **LOGITS_FP32)


def test_inspect_counts_fused_experts() -> None:
    from loratools.ops.moe import fused_experts
    from loratools.ops.structure import model_structure

    shapes = {
        f"{EXPERTS_MODULE}.gate_up_proj": (3, 16, 24),
        f"{EXPERTS_MODULE}.gate_up_proj_bias": (3, 24),  # a bias: not an expert weight
        f"{EXPERTS_MODULE}.down_proj": (3, 12, 16),
        "model.layers.0.mlp.router.weight": (3, 16),
    }
    assert fused_experts(shapes) == {f"{EXPERTS_MODULE}.gate_up_proj": 3, f"{EXPERTS_MODULE}.down_proj": 3}
    assert model_structure(shapes, None)["experts"] == {"weights": 6, "experts": 3}


def test_spectrum_with_base_reads_fused_experts(tmp_path: Path) -> None:
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint

    base_dir, adapter_dir, model = _saved(tmp_path)
    base = open_checkpoint(base_dir)
    adapter = load_adapter(adapter_dir, base_shapes={i.name: tuple(i.shape) for i in base.infos()})
    report = adapter_spectrum(adapter, base=base)
    expected = {}
    for wrapper in _wrappers(model):
        delta = wrapper.get_delta_weight("default").double()
        for e in range(delta.shape[0]):
            name = fused_name(f"{EXPERTS_MODULE}.{wrapper.parameter_name}", e)
            expected[name] = torch.linalg.svdvals(delta[e])[:2]
    assert {m.name for m in report.modules} == set(expected)
    for module in report.modules:
        # rank-2 float32 factors: singular values to float32 relative precision
        torch.testing.assert_close(
            module.singular_values.double(), expected[module.name], rtol=1e-5, atol=1e-6
        )
        assert module.amplification is not None  # measured against the expert's own base slice
    assert report.to_dict()["experts"] == ALL_EXPERTS_TOUCHED


def test_unmerge_gives_back_the_base_and_a_missing_fused_tensor_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from loratools.commands.merge import merge_paths

    base, adapter, _ = _saved(tmp_path)
    merge_paths(str(base), tmp_path / "merged", add=[(str(adapter), 1.0)])
    merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=[(str(adapter), 1.0)])
    original, back = load_file(base / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    for name in (f"{EXPERTS_MODULE}.gate_up_proj", f"{EXPERTS_MODULE}.down_proj"):
        # W0 + Δ − Δ in float32: two roundings of values of size ~1
        torch.testing.assert_close(back[name], original[name], rtol=1e-5, atol=1e-6)
    # a base without down_proj: its three experts' deltas would be lost, so nothing is written
    lacking = {k: v for k, v in original.items() if not k.endswith("experts.down_proj")}
    (tmp_path / "lacking").mkdir()
    save_file(lacking, str(tmp_path / "lacking" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoratoolsError, match="fit no 3-D base tensor"):
        merge_paths(str(tmp_path / "lacking"), tmp_path / "out", add=[(str(adapter), 1.0)])
    assert not (tmp_path / "out").exists()


def test_square_expert_slices_take_the_layout_from_the_model_class(tmp_path: Path) -> None:
    from loratools.commands.merge import merge_paths

    # hidden = intermediate (as in gpt-oss-20b, 2880): down_proj (E, 16, 16) fits both layouts
    base, adapter, model = _saved(tmp_path, lambda: _gpt_oss(intermediate=16))
    merge_paths(str(base), tmp_path / "merged", add=[(str(adapter), 1.0)])
    merged = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, **LOGITS_FP32)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["auto_mapping"]  # without the model class the square slice is ambiguous: refused
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatch, match=r"adapter: .*square slice.*base_model_class"):
        merge_paths(str(base), tmp_path / "again", add=[(str(adapter), 1.0)])
