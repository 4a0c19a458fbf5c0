"""DoRA: reading, merge/unmerge/swap with the norms record, judged by PEFT itself where it can be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.commands.merge import merge_paths
from loratools.errors import LoratoolsError, UnknownFormat
from loratools.formats import LoadContext, kohya, peft
from loratools.io.adapter_dir import load_adapter, read_safetensors, save_adapter
from loratools.io.dora_record import read_record_file
from loratools.ops.dora import dora_weight, effective_delta, row_norms
from loratools.ops.merge.dora import DoraRecord
from tests.tolerances import EPS, F32_WEIGHTS, TOL


def read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        tensors.update(read_safetensors(file)[0])
    return tensors


def read_record(path: Path) -> DoraRecord | None:
    stored = read_record_file(path)
    return DoraRecord.from_tensors(*stored, str(path)) if stored is not None else None


def make_peft_dora(base: Path, out: Path, seed: int = 0, **config: object) -> Path:
    """A DoRA adapter written by PEFT itself: random non-zero B and magnitudes ≠ ‖W0 + sBA‖."""
    from peft import LoraConfig, get_peft_model

    from tests.peft_helpers import load_llama

    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]} | config
    model = get_peft_model(load_llama(base), LoraConfig(use_dora=True, init_lora_weights=False, **options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.3 * torch.randn_like(parameter))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapters: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapters`` (in order) into ``base`` loaded in ``dtype``."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(adapter, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model.base_model.set_adapter(names)
    return {k: v.detach() for k, v in peft_model.merge_and_unload(adapter_names=names).state_dict().items()}


# -- the math, against a direct transcription of PEFT's formula ------------------------------------
def _dora(out: int = 6, inp: int = 5, rank: int = 2) -> tuple[torch.Tensor, LoraWeight]:
    w0 = torch.randn(out, inp, dtype=torch.float64)
    lora = LoraWeight(torch.randn(rank, inp), torch.randn(out, rank), 3.0, magnitude=torch.rand(out) + 0.5)
    return w0, lora


def test_dora_weight_is_pefts_formula_and_rows_have_the_magnitude() -> None:
    w0, lora = _dora()
    v = w0 + lora.scale * lora.b.double() @ lora.a.double()
    expected = lora.magnitude.double()[:, None] / v.norm(dim=1, keepdim=True) * v  # type: ignore[union-attr]
    merged, norms = dora_weight(w0.float(), lora)
    torch.testing.assert_close(merged.double(), expected, **TOL[torch.float32])
    torch.testing.assert_close(row_norms(merged), lora.magnitude, **TOL[torch.float32])
    torch.testing.assert_close(norms.double(), v.norm(dim=1), **TOL[torch.float32])


def test_fan_in_fan_out_works_in_the_stored_layout() -> None:
    w0, lora = _dora()
    merged, _ = dora_weight(w0.float(), lora)
    transposed, _ = dora_weight(w0.float().T.contiguous(), lora, transposed=True)
    torch.testing.assert_close(transposed.T, merged, **TOL[torch.float32])
    torch.testing.assert_close(effective_delta(w0.float(), lora), merged - w0.float(), **TOL[torch.float32])


# -- formats ------------------------------------------------------------------------------------------
def test_peft_round_trip_keeps_the_magnitude(tmp_path: Path) -> None:
    _, lora = _dora()
    adapter = Adapter({"model.m": lora})
    tensors, _, config = peft.from_adapter(adapter)
    assert config["use_dora"] is True
    assert torch.equal(tensors["base_model.model.model.m.lora_magnitude_vector"], lora.magnitude)
    back = peft.to_adapter(tensors, context=LoadContext(config=config))
    assert back.weights["model.m"].kind == "dora"
    assert torch.equal(back.weights["model.m"].magnitude, lora.magnitude)


def test_peft_refuses_inconsistent_or_unsupported_dora() -> None:
    a, b = torch.zeros(2, 4), torch.zeros(4, 2)
    keys = {"base_model.model.m.lora_A.weight": a, "base_model.model.m.lora_B.weight": b}
    with pytest.raises(UnknownFormat, match="use_dora true"):
        peft.to_adapter(keys, context=LoadContext(config={"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(UnknownFormat, match="use_dora false"):
        peft.to_adapter(
            {**keys, "base_model.model.m.lora_magnitude_vector": torch.ones(4)},
            context=LoadContext(config={"peft_type": "LORA"}),
        )
    conv = {**keys, "base_model.model.m.lora_magnitude_vector": torch.ones(1, 4, 1, 1)}
    with pytest.raises(UnknownFormat, match="DoRA on conv modules"):
        peft.to_adapter(conv, context=LoadContext(config={"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(UnknownFormat, match="DoRA and 1 plain"):
        peft.from_adapter(Adapter({"x": _dora()[1], "y": LoraWeight(a, b, 1.0)}))


def test_kohya_dora_scale_out_axis_reads_and_in_axis_is_refused() -> None:
    _, lora = _dora()
    tensors, metadata, _ = kohya.from_adapter(Adapter({"model.m": lora}))
    assert tuple(tensors["lora_unet_model_m.dora_scale"].shape) == (6, 1)
    back = kohya.to_adapter(tensors, metadata)
    assert torch.equal(back.weights["model.m"].magnitude, lora.magnitude)
    tensors["lora_unet_model_m.dora_scale"] = torch.ones(1, 5)
    with pytest.raises(UnknownFormat, match="wd_on_out=False"):
        kohya.to_adapter(tensors, metadata)


# -- merge / unmerge / swap on a small checkpoint, exact formulas --------------------------------------
@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    base = {"l.0.q.weight": torch.randn(8, 6), "l.0.v.weight": torch.randn(4, 6), "norm": torch.ones(6)}
    folder = tmp_path / "base"
    folder.mkdir()
    save_file(base, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, base


def _save_dora(tmp_path: Path, name: str, modules: dict[str, tuple[int, int]], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    weights = {
        m: LoraWeight(torch.randn(2, k, generator=g), torch.randn(d, 2, generator=g), 2.0,
                      magnitude=torch.rand(d, generator=g) + 2.0)
        for m, (d, k) in modules.items()
    }  # fmt: skip
    return save_adapter(Adapter(weights), tmp_path / name)


def test_merge_writes_the_record_and_unmerge_recovers_the_base(small, tmp_path: Path) -> None:
    folder, base = small
    dora = _save_dora(tmp_path, "dora", {"l.0.q": (8, 6), "l.0.v": (4, 6)}, seed=1)
    report = merge_paths(str(folder), tmp_path / "merged", add=[(str(dora), 1.0)])
    merged = read_all(tmp_path / "merged")
    lora = load_adapter(dora).weights["l.0.q"]
    expected, norms = dora_weight(base["l.0.q.weight"], lora)
    torch.testing.assert_close(merged["l.0.q.weight"], expected, **TOL[torch.float32])
    stats = {m.name: m for m in report.modules}["l.0.q.weight"]  # 8 rows: every row is sampled
    w0 = base["l.0.q.weight"]
    # float32 norms of the same rows vs here
    assert stats.relative_delta == pytest.approx(float((expected - w0).norm() / w0.norm()), rel=1e-5)
    assert stats.lost_fraction == 0.0  # float32 out of float32 math: nothing rounds away
    record = read_record(tmp_path / "merged" / "dora_norms.loratools")
    assert record is not None and [t.label for t in record.terms] == [str(dora)]
    torch.testing.assert_close(record.norms[(0, "l.0.q.weight")], norms, **TOL[torch.float32])

    merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=[(str(dora), 1.0)])
    back = read_all(tmp_path / "back")
    for name, tensor in base.items():  # W0 = W'·n/m − sBA: a few float32 roundings of |W0|-sized values
        torch.testing.assert_close(back[name], tensor, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "back" / "dora_norms.loratools").exists()


def test_unmerge_without_the_record_refuses_and_writes_nothing(small, tmp_path: Path) -> None:
    folder, _ = small
    dora = _save_dora(tmp_path, "dora", {"l.0.q": (8, 6)}, seed=1)
    merge_paths(str(folder), tmp_path / "merged", add=[(str(dora), 1.0)])
    (tmp_path / "merged" / "dora_norms.loratools").unlink()
    with pytest.raises(LoratoolsError, match="needs the per-row norms"):
        merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=[(str(dora), 1.0)])
    assert not (tmp_path / "back").exists()


def test_dora_weight_other_than_one_and_out_of_order_removal_are_refused(small, tmp_path: Path) -> None:
    folder, _ = small
    first = _save_dora(tmp_path, "first", {"l.0.q": (8, 6)}, seed=1)
    second = _save_dora(tmp_path, "second", {"l.0.q": (8, 6)}, seed=2)
    with pytest.raises(LoratoolsError, match="weight 1 only"):
        merge_paths(str(folder), tmp_path / "x", add=[(str(first), 0.5)])
    merge_paths(str(folder), tmp_path / "merged", add=[(str(first), 1.0), (str(second), 1.0)])
    with pytest.raises(LoratoolsError, match="not among the adapters merged last"):
        merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=[(str(first), 1.0)])


def test_swap_takes_the_last_dora_out_and_puts_another_in(small, tmp_path: Path) -> None:
    folder, base = small
    first = _save_dora(tmp_path, "first", {"l.0.q": (8, 6), "l.0.v": (4, 6)}, seed=1)
    second = _save_dora(tmp_path, "second", {"l.0.q": (8, 6)}, seed=2)
    merge_paths(str(folder), tmp_path / "m1", add=[(str(first), 1.0)])
    merge_paths(str(tmp_path / "m1"), tmp_path / "m2", add=[(str(second), 1.0)], remove=[(str(first), 1.0)])
    merge_paths(str(folder), tmp_path / "direct", add=[(str(second), 1.0)])
    swapped, direct = read_all(tmp_path / "m2"), read_all(tmp_path / "direct")
    for name in base:
        # swap vs direct: W0 + ΔW in another order
        torch.testing.assert_close(swapped[name], direct[name], **F32_WEIGHTS)
    record = read_record(tmp_path / "m2" / "dora_norms.loratools")
    assert record is not None and [t.label for t in record.terms] == [str(second)]


def test_stacked_merge_undone_in_one_pass(small, tmp_path: Path) -> None:
    folder, base = small
    first = _save_dora(tmp_path, "first", {"l.0.q": (8, 6)}, seed=1)
    second = _save_dora(tmp_path, "second", {"l.0.q": (8, 6), "l.0.v": (4, 6)}, seed=2)
    adapters = [(str(first), 1.0), (str(second), 1.0)]
    merge_paths(str(folder), tmp_path / "merged", add=adapters)
    merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=adapters)
    back = read_all(tmp_path / "back")
    for name, tensor in base.items():
        # merge then unmerge: float32 round trip
        torch.testing.assert_close(back[name], tensor, **F32_WEIGHTS)


# -- PEFT is the judge ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("base", ["base", "base-bf16"])
def test_merge_matches_peft_merge_and_unload(fixtures_dir: Path, tmp_path: Path, base: str) -> None:
    dtype = torch.float32 if base == "base" else torch.bfloat16
    adapter = make_peft_dora(fixtures_dir / "base", tmp_path / "dora", use_rslora=True, rank_pattern={"v_proj": 2},
                             alpha_pattern={"down_proj": 3})  # fmt: skip
    reference = peft_merged(fixtures_dir / base, [adapter], dtype)
    merge_paths(str(fixtures_dir / base), tmp_path / "out", add=[(str(adapter), 1.0)])
    ours = read_all(tmp_path / "out")
    assert set(ours) == set(reference)
    changed = [n for n, t in read_all(fixtures_dir / base).items() if not torch.equal(t, ours[n])]
    assert len(changed) == 2 * 3
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype == dtype
        # bf16: PEFT computes the norm and the product in bf16, loratools in float32 and rounds once,
        # so an element may differ by one bf16 rounding (TOL[bf16]); float32: a few roundings.
        torch.testing.assert_close(tensor, reference[name], **TOL[dtype])
    back = merge_paths(str(tmp_path / "out"), tmp_path / "back", remove=[(str(adapter), 1.0)])
    assert back.operation == "unmerge"
    assert_recovers_base(
        read_all(tmp_path / "back"), read_all(fixtures_dir / base), load_adapter(adapter), dtype
    )


def assert_recovers_base(back: dict, original: dict, adapter: Adapter, dtype: torch.dtype) -> None:
    """Unmerge with the record is exact up to rounding: W' was rounded to the dtype (relative
    error ≤ ε/2 of |W'|, which becomes ε/2·|V| after V = W'·n/m, V = W0 + sBA), then W0 = V − sBA
    is rounded once more (ε/2·|W0|). float32 adds a few more roundings (norms, m/n), hence 4×."""
    slack = 1.0 if dtype == torch.bfloat16 else 4.0
    for name, tensor in back.items():
        module = name.removesuffix(".weight")
        if module not in adapter.weights:
            assert torch.equal(tensor, original[name])  # untouched tensors are copied as they are
            continue
        w0 = original[name].float()
        v = w0 + adapter.weights[module].delta()
        bound = slack * EPS[dtype] / 2 * (v.abs() + w0.abs()) * 1.01
        assert bool(((tensor.float() - w0).abs() <= bound).all()), name


@pytest.mark.slow
def test_plain_then_dora_stack_matches_peft(fixtures_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tests.peft_helpers import load_llama

    plain = get_peft_model(load_llama(fixtures_dir / "base"), LoraConfig(r=2, target_modules=["q_proj"],
                                                                        init_lora_weights=False))  # fmt: skip
    plain.save_pretrained(tmp_path / "plain")
    dora = make_peft_dora(fixtures_dir / "base", tmp_path / "dora", seed=3)
    second = make_peft_dora(fixtures_dir / "base", tmp_path / "dora2", seed=4, target_modules=["q_proj"])
    order = [tmp_path / "plain", dora, second]  # q_proj: plain, then DoRA, then DoRA again
    reference = peft_merged(fixtures_dir / "base", order, torch.float32)
    merge_paths(str(fixtures_dir / "base"), tmp_path / "out", add=[(str(p), 1.0) for p in order])
    for name, tensor in read_all(tmp_path / "out").items():
        torch.testing.assert_close(tensor, reference[name], **TOL[torch.float32])
    # and all three come out again in one pass, last merged first
    merge_paths(str(tmp_path / "out"), tmp_path / "back", remove=[(str(p), 1.0) for p in order])
    back = read_all(tmp_path / "back")
    for name, tensor in read_all(fixtures_dir / "base").items():  # float32: a few roundings per step
        torch.testing.assert_close(back[name], tensor, rtol=1e-5, atol=1e-5)


# -- DoRA → plain LoRA: Eckart–Young on the effective update ------------------------------------------
@pytest.mark.parametrize(("rank", "transposed"), [(1, False), (3, False), (3, True), (8, False)])
def test_bake_module_is_within_one_percent_of_eckart_young(rank: int, transposed: bool) -> None:
    from loratools.ops.dora_bake import bake_module

    w0 = torch.randn(48, 40)
    lora = LoraWeight(torch.randn(4, 40) * 0.1, torch.randn(48, 4) * 0.1, 4.0, magnitude=w0.norm(dim=1) * 1.1)
    base = w0.T.contiguous() if transposed else w0
    baked, record = bake_module("m", base, lora, transposed=transposed, rank=rank)
    delta = effective_delta(w0, lora)  # (out, in)
    s = torch.linalg.svdvals(delta.double())
    optimal = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    actual = float((delta - baked.delta()).norm() / delta.norm())
    assert baked.rank == record.rank == rank and baked.scale == pytest.approx(1.0)
    assert actual == pytest.approx(record.relative_error, rel=1e-4)  # float32 norms of the same baked delta
    # randomized SVD within 1% of optimal; 1e-6 float32 rounding
    assert optimal <= actual <= 1.01 * optimal + 1e-6
    # float32 σ's of the effective delta vs float64
    assert record.energy_kept == pytest.approx(float(s[:rank].square().sum() / s.square().sum()), rel=1e-3)


def test_bake_by_energy_keeps_at_least_that_energy() -> None:
    from loratools.ops.dora_bake import bake_adapter

    w0 = torch.randn(24, 20)
    lora = LoraWeight(torch.randn(2, 20), torch.randn(24, 2), 2.0, magnitude=torch.rand(24) + 1.0)
    baked, report = bake_adapter(Adapter({"m": lora}), [("m", w0)], energy=0.9)
    s = torch.linalg.svdvals(effective_delta(w0, lora).double())
    smallest = int((s.square().cumsum(0) / s.square().sum() >= 0.9).nonzero()[0]) + 1
    assert report[0].rank == baked.weights["m"].rank == smallest
    assert report[0].energy_kept >= 0.9 - 1e-9  # float64 rounding of the energy sums
    assert baked.weights["m"].kind == "lora"


# -- extract --dora: the alternating fit -----------------------------------------------------------------
def _plain(w0: torch.Tensor, y: torch.Tensor, rank: int) -> LoraWeight:
    from loratools.linalg import exact_svd

    b, a = exact_svd(y - w0).truncate(rank).factors("sqrt")
    return LoraWeight(a, b, 2.0 * rank)  # scale 2: the DoRA factors must fold it back in


def test_dora_extract_recovers_a_dora_shaped_finetune() -> None:
    from loratools.ops.extract.dora import dora_module

    w0 = torch.randn(40, 32)
    y = (1.0 + 0.2 * torch.randn(40, 1)) * (w0 + 0.3 * torch.randn(40, 3) @ torch.randn(3, 32))
    weight, report = dora_module("m", w0, y, _plain(w0, y, 3))
    assert weight.kind == "dora" and weight.rank == 3 and weight.scale == pytest.approx(2.0)
    merged, _ = dora_weight(w0, weight)
    # a ratio of float32 norms whose numerator is small: its rounding is ~1e-6 / ratio
    assert report.relative_error == pytest.approx(
        float((merged - y).norm() / (y - w0).norm()), rel=1e-3, abs=1e-6
    )
    assert report.relative_error < 1e-3 < 0.1 < report.lora_relative_error  # rank 3 LoRA cannot rescale rows


def test_dora_extract_never_loses_to_lora_on_a_generic_finetune() -> None:
    from loratools.ops.extract.dora import dora_module

    w0 = torch.randn(30, 20)
    y = w0 + 0.1 * torch.randn(30, 20) + 0.5 * torch.randn(30, 2) @ torch.randn(2, 20)
    for rank in (1, 2, 4):
        _, report = dora_module("m", w0, y, _plain(w0, y, rank))
        assert report.relative_error <= report.lora_relative_error * (1 + 1e-5)  # float32 rounding


def test_keep_quantization_refuses_dora_before_writing(small, tmp_path: Path) -> None:
    from loratools.ops.merge import MergeOptions

    folder, _ = small
    dora = _save_dora(tmp_path, "dora", {"l.0.q": (8, 6)}, seed=1)
    with pytest.raises(LoratoolsError, match="keep-quantization does not handle DoRA"):
        merge_paths(
            str(folder), tmp_path / "q", add=[(str(dora), 1.0)], options=MergeOptions(keep_quantization=True)
        )
    assert not (tmp_path / "q").exists()


@pytest.mark.gpu
def test_cuda_dora_merge_and_unmerge_match_cpu(small, tmp_path: Path) -> None:
    from loratools.ops.merge import MergeOptions

    folder, _ = small
    dora = _save_dora(tmp_path, "dora", {"l.0.q": (8, 6), "l.0.v": (4, 6)}, seed=1)
    for device in ("cpu", "cuda"):
        options = MergeOptions(device=device)
        merge_paths(str(folder), tmp_path / f"m-{device}", add=[(str(dora), 1.0)], options=options)
        merge_paths(
            str(tmp_path / f"m-{device}"),
            tmp_path / f"b-{device}",
            remove=[(str(dora), 1.0)],
            options=options,
        )
    for stage in ("m", "b"):
        cpu, gpu = read_all(tmp_path / f"{stage}-cpu"), read_all(tmp_path / f"{stage}-cuda")
        for name in cpu:  # the same float32 math on another device: rounding-level differences
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-5)


def test_dora_on_embeddings_and_conv_is_refused_by_name() -> None:
    embedding = {
        "base_model.model.embed.lora_embedding_A": torch.zeros(2, 10),
        "base_model.model.embed.lora_embedding_B": torch.zeros(4, 2),
        "base_model.model.embed.lora_magnitude_vector": torch.ones(10),
    }
    with pytest.raises(UnknownFormat, match="DoRA on embedding modules"):
        peft.to_adapter(
            embedding,
            context=LoadContext(config={"peft_type": "LORA", "use_dora": True, "r": 2, "lora_alpha": 2}),
        )
    conv = {
        "lora_unet_c.lora_down.weight": torch.zeros(2, 3, 3, 3),
        "lora_unet_c.lora_up.weight": torch.zeros(4, 2, 1, 1),
        "lora_unet_c.dora_scale": torch.ones(4, 1, 1, 1),
    }
    with pytest.raises(UnknownFormat, match="DoRA"):  # named by formats/lycoris.py (a LoCon file)
        kohya.to_adapter(conv, {}, keep_stems=True)


@pytest.mark.slow
def test_fan_in_fan_out_gpt2_matches_peft(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as (in, out): PEFT transposes before the row norm, and so must we."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True,
                      init_lora_weights=False)  # fmt: skip
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.3 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "dora")
    reference = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    merge_paths(str(tmp_path / "base"), tmp_path / "out", add=[(str(tmp_path / "dora"), 1.0)])
    ours, base = read_all(tmp_path / "out"), read_all(tmp_path / "base")
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert not torch.equal(ours[name], base[name])  # (in, out) weights that DoRA did change
        torch.testing.assert_close(ours[name], reference[name], **TOL[torch.float32])


def test_a_record_from_another_model_is_refused_before_writing(small, tmp_path: Path) -> None:
    folder, _ = small
    dora = _save_dora(tmp_path, "dora", {"l.0.q": (8, 6), "l.0.v": (4, 6)}, seed=1)
    merge_paths(str(folder), tmp_path / "merged", add=[(str(dora), 1.0)])
    record = tmp_path / "merged" / "dora_norms.loratools"
    stored = read_record(record)
    assert stored is not None
    stored.norms = {
        k: v for k, v in stored.norms.items() if k[1] != "l.0.v.weight"
    }  # drop one tensor's norms
    from loratools.io.dora_record import write_record_file

    write_record_file(record, *stored.to_tensors())
    with pytest.raises(LoratoolsError, match=r"no DoRA norms for 1 tensor\(s\) \(l.0.v.weight\)"):
        merge_paths(str(tmp_path / "merged"), tmp_path / "back", remove=[(str(dora), 1.0)])
    assert not (tmp_path / "back").exists()


def test_training_on_from_a_dora_adapter_is_refused() -> None:
    from torch import nn

    from loratools.train.inject import load_lora_adapter

    model = nn.Sequential(nn.Linear(6, 6))
    adapter = Adapter({"0": LoraWeight(torch.zeros(2, 6), torch.zeros(6, 2), 2.0, magnitude=torch.ones(6))})
    with pytest.raises(LoratoolsError, match="has no DoRA layer"):
        load_lora_adapter(model, adapter)
    assert isinstance(model[0], nn.Linear)  # nothing was injected


def test_dora_extract_keeps_the_magnitude_in_float32_for_a_bf16_finetune() -> None:
    """‖ΔW‖ ≪ ‖W0‖ as in real fine-tunes: a bf16 magnitude (2⁻⁹ of each row) would swamp the update."""
    from loratools.ops.extract.dora import dora_module

    w0 = torch.randn(64, 48).to(torch.bfloat16)
    y = (w0.float() + 0.02 * torch.randn(64, 4) @ torch.randn(4, 48) + 0.002 * torch.randn(64, 48)).to(
        torch.bfloat16
    )
    weight, report = dora_module("m", w0, y, _plain(w0.float(), y.float(), 2).to(torch.bfloat16))
    assert weight.a.dtype == torch.bfloat16 and weight.magnitude is not None
    assert weight.magnitude.dtype == torch.float32
    assert report.relative_error <= report.lora_relative_error * (1 + 1e-5)  # float32 rounding
