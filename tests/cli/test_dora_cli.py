"""DoRA from the command line: inspect, convert (DoRA → plain LoRA), spectrum, extract --dora, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools.adapter import Adapter, LoraWeight
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.dora import dora_weight, effective_delta
from tests.tolerances import TOL

MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.down_proj": (32, 64)}


def write_dora(folder: Path, fixtures_dir: Path, rank: int = 4) -> Adapter:
    """A DoRA adapter on the fixture base: random factors, magnitudes 0.8–1.3 × ‖W0‖_row."""
    g = torch.Generator().manual_seed(11)
    ckpt = open_checkpoint(fixtures_dir / "base")
    weights = {}
    for module, (out, inp) in MODULES.items():
        w0 = ckpt.get(f"{module}.weight").float()
        m = w0.norm(dim=1) * (0.8 + 0.5 * torch.rand(out, generator=g))
        weights[module] = LoraWeight(
            torch.randn(rank, inp, generator=g) * 0.3,
            torch.randn(out, rank, generator=g) * 0.3,
            8.0,
            magnitude=m,
        )
    adapter = Adapter(weights, base_model=str(fixtures_dir / "base"), task_type="CAUSAL_LM")
    save_adapter(adapter, folder)
    return adapter


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def test_convert_dora_to_lora_reports_near_optimal_errors(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    adapter = write_dora(tmp_path / "dora", fixtures_dir)
    result = run_cli(
        "convert", tmp_path / "dora", "--to", "peft", "-o", tmp_path / "lora", "--base", fixtures_dir / "base",
        "-r", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = {m["name"]: m for m in json.loads(result.stdout)["dora_baked"]}
    baked = load_adapter(tmp_path / "lora")
    ckpt = open_checkpoint(fixtures_dir / "base")
    for module, weight in adapter.weights.items():
        delta = effective_delta(ckpt.get(f"{module}.weight").float(), weight)
        lora = baked.weights[module]
        assert lora.kind == "lora" and lora.rank == 3
        error = float((delta - lora.delta()).norm() / delta.norm())
        # a ratio of float32 norms with a small numerator
        assert error == pytest.approx(report[module]["relative_error"], rel=1e-3)
        assert error <= 1.01 * optimal_error(delta, 3) + 1e-6  # Eckart–Young, randomized SVD


def test_dora_to_gguf_needs_a_rank_and_plain_lora_refuses_one(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    write_dora(tmp_path / "dora", fixtures_dir)
    out = tmp_path / "x.gguf"
    result = run_cli("convert", tmp_path / "dora", "--to", "gguf", "-o", out, "--base", fixtures_dir / "base")
    assert result.exit_code == 1 and "llama.cpp does not run" in result.stderr and not out.exists()
    result = run_cli("convert", fixtures_dir / "adapter", "--to", "peft", "-o", tmp_path / "p", "-r", "2",
                     "--base", fixtures_dir / "base")  # fmt: skip
    assert result.exit_code == 1 and "plain LoRA" in result.stderr and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_full_rank_bake_reproduces_the_dora_model_in_peft(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    from tests.peft_helpers import logits_through_peft, tokens

    write_dora(tmp_path / "dora", fixtures_dir)
    result = run_cli(
        "convert", tmp_path / "dora", "--to", "peft", "-o", tmp_path / "lora", "--base", fixtures_dir / "base",
        "-r", "32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = tokens()
    dora = logits_through_peft(fixtures_dir / "base", tmp_path / "dora", ids)
    lora = logits_through_peft(fixtures_dir / "base", tmp_path / "lora", ids)
    # rank 32 = min(d, k) for both modules: the bake is exact up to float32 SVD rounding
    torch.testing.assert_close(lora, dora, rtol=1e-4, atol=1e-4)


def test_inspect_shows_dora_and_its_magnitudes(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    adapter = write_dora(tmp_path / "dora", fixtures_dir)
    result = run_cli("inspect", tmp_path / "dora", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["algorithm"] == "DoRA" and summary["kinds"] == {"dora": 2}
    assert summary["tensors"] == 3 * 2
    stats = {m["name"]: m for m in summary["dora"]["magnitude"]}
    for module, weight in adapter.weights.items():
        assert stats[module]["max"] == pytest.approx(float(weight.magnitude.max()))
        assert "relative_change" not in stats[module]
    with_base = run_cli("inspect", tmp_path / "dora", "--base", fixtures_dir / "base", "--json")
    ckpt = open_checkpoint(fixtures_dir / "base")
    for m in json.loads(with_base.stdout)["dora"]["magnitude"]:
        w0 = ckpt.get(f"{m['name']}.weight").float()
        ratio = adapter.weights[m["name"]].magnitude / w0.norm(dim=1) - 1  # write_dora drew 0.8–1.3
        assert m["relative_change"]["mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    table = run_cli("inspect", tmp_path / "dora", "--base", fixtures_dir / "base")
    assert table.exit_code == 0 and "DoRA magnitude" in table.stderr


def test_spectrum_of_dora_is_the_effective_update_and_needs_the_base(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    adapter = write_dora(tmp_path / "dora", fixtures_dir)
    refused = run_cli("spectrum", tmp_path / "dora")
    assert refused.exit_code == 1 and "--base" in refused.stderr
    result = run_cli("spectrum", tmp_path / "dora", "--base", fixtures_dir / "base", "--exact", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    ckpt = open_checkpoint(fixtures_dir / "base")
    for module in document["modules"]:
        w0 = ckpt.get(f"{module['name']}.weight").float()
        s = torch.linalg.svdvals(effective_delta(w0, adapter.weights[module["name"]]).double())
        assert module["complete"] and len(module["singular_values"]) == len(s)
        # float32 σ's from the command vs float64 svdvals
        torch.testing.assert_close(
            torch.tensor(module["singular_values"], dtype=torch.float64), s, rtol=1e-4, atol=1e-6
        )
        assert module["effective_rank"]["0.99"] > 4  # full-rank: more than the LoRA rank of s·B·A
    magnitudes = {m["name"]: m for m in document["settings"]["dora_magnitude"]}
    assert set(magnitudes) == set(adapter.weights) and all(
        "relative_change" in m for m in magnitudes.values()
    )


def test_resize_and_combine_refuse_dora_by_name(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    write_dora(tmp_path / "dora", fixtures_dir)
    for args in (("resize", tmp_path / "dora", "-r", "2", "-o", tmp_path / "r"),
                 ("combine", tmp_path / "dora", fixtures_dir / "adapter", "-o", tmp_path / "c")):  # fmt: skip
        result = run_cli(*args)
        assert result.exit_code == 1 and "DoRA module" in result.stderr and "convert" in result.stderr
        assert not Path(args[-1]).exists()


def _dora_finetune(fixtures_dir: Path, folder: Path) -> Path:
    """A fine-tune that DoRA can represent at rank 2: W_ft = diag(g)·(W0 + rank-2), per row g ≈ 1 ± 0.2."""
    import shutil

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    shutil.copytree(fixtures_dir / "base", folder)
    ckpt = open_checkpoint(fixtures_dir / "base")
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w0 = tensors[name]
        low = torch.randn(w0.shape[0], 2, generator=g) @ torch.randn(2, w0.shape[1], generator=g) * 0.05
        rows = 1.0 + 0.2 * torch.randn(w0.shape[0], 1, generator=g)
        tensors[name] = (rows * (w0 + low)).to(w0.dtype)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("finetuned", ["fixture", "dora-like"])
def test_extract_dora_is_no_worse_than_lora(
    run_cli, fixtures_dir: Path, tmp_path: Path, finetuned: str
) -> None:
    tuned = (
        fixtures_dir / "finetuned"
        if finetuned == "fixture"
        else _dora_finetune(fixtures_dir, tmp_path / "ft")
    )
    targets = ("--targets", "q_proj,down_proj")  # 4 of the 14 linears: enough, and fast
    result = run_cli(
        "extract",
        fixtures_dir / "base",
        tuned,
        "-r",
        "2",
        "-o",
        tmp_path / "dora",
        "--dora",
        *targets,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    adapter = load_adapter(tmp_path / "dora")
    assert {w.kind for w in adapter.weights.values()} == {"dora"}
    base, ft = open_checkpoint(fixtures_dir / "base"), open_checkpoint(tuned)
    reports = {r["name"]: r for r in summary["dora"]}
    for name, weight in adapter.weights.items():
        w0, y = base.get(f"{name}.weight").float(), ft.get(f"{name}.weight").float()
        merged, _ = dora_weight(w0, weight)
        error = float((merged - y).norm() / (y - w0).norm())
        # a ratio of float32 norms with a small numerator
        assert error == pytest.approx(reports[name]["relative_error"], rel=1e-3, abs=1e-6)
        # never worse than the plain LoRA at the same rank (its direction is a candidate); the
        # slack covers rounding the factors to the fixture's float32 (a few ulps of ‖W‖)
        # DoRA never worse than LoRA, up to float32 rounding
        assert reports[name]["relative_error"] <= reports[name]["lora_relative_error"] * (1 + 1e-4) + 1e-6
    if finetuned == "dora-like":  # rows rescaled + rank 2: DoRA represents it, LoRA at rank 2 cannot
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            # DoRA fits it up to the randomized SVD (≪ 1%); rank-2 LoRA cannot rescale rows (> 1%)
            assert reports[name]["relative_error"] < 0.01 < reports[name]["lora_relative_error"]


@pytest.mark.slow
def test_extract_dora_loads_in_peft_and_its_logits_match_w_prime(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    from tests.peft_helpers import load_llama, logits, logits_through_peft, tokens

    result = run_cli("extract", fixtures_dir / "base", fixtures_dir / "finetuned", "-r", "3", "-o", tmp_path / "d",
                     "--dora")  # fmt: skip
    assert result.exit_code == 0, result.output
    adapter = load_adapter(tmp_path / "d")
    model = load_llama(fixtures_dir / "base")
    state = model.state_dict()
    for name, weight in adapter.weights.items():
        state[f"{name}.weight"] = dora_weight(state[f"{name}.weight"], weight)[0]  # W' by hand
    model.load_state_dict(state)
    ids = tokens()
    # PEFT computes W0·x + (m/‖W0 + sBA‖ − 1)·W0·x + m/‖…‖·sBA·x, the same W' in another order
    torch.testing.assert_close(logits_through_peft(fixtures_dir / "base", tmp_path / "d", ids),
                               logits(model, ids), rtol=1e-4, atol=1e-5)  # fmt: skip


def test_merge_unmerge_swap_from_the_command_line(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    write_dora(tmp_path / "dora", fixtures_dir)
    merged = run_cli("merge", fixtures_dir / "base", tmp_path / "dora", "-o", tmp_path / "m", "--json")
    assert merged.exit_code == 0, merged.output
    record = json.loads(merged.stdout)["dora_record"]
    assert record == str(tmp_path / "m" / "dora_norms.loratools") and Path(record).is_file()
    half = run_cli("merge", fixtures_dir / "base", tmp_path / "dora", "-w", "0.5", "-o", tmp_path / "h")
    assert half.exit_code == 1 and "weight 1 only" in half.stderr and not (tmp_path / "h").exists()
    back = run_cli("unmerge", tmp_path / "m", tmp_path / "dora", "-o", tmp_path / "b")
    assert back.exit_code == 0, back.output
    base, restored = open_checkpoint(fixtures_dir / "base"), open_checkpoint(tmp_path / "b")
    for name in base.names():  # float32: a few roundings of |W'| (see tests/ops/test_dora.py for the bound)
        torch.testing.assert_close(restored.get(name), base.get(name), rtol=1e-5, atol=1e-5)
    Path(record).unlink()
    refused = run_cli("unmerge", tmp_path / "m", tmp_path / "dora", "-o", tmp_path / "c")
    assert refused.exit_code == 1 and "no record at" in refused.stderr and not (tmp_path / "c").exists()
    assert refused.stderr.count("\n") == 1  # one line, no traceback
    swapped = run_cli("swap", tmp_path / "m", "--remove", tmp_path / "dora", "--add", fixtures_dir / "adapter",
                      "-o", tmp_path / "s")  # fmt: skip
    assert swapped.exit_code == 1 and "no record at" in swapped.stderr


def test_dora_baked_into_gguf_carries_the_same_lora(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from loratools.formats import gguf as gguf_names

    write_dora(tmp_path / "dora", fixtures_dir)
    common = ("--base", fixtures_dir / "base", "-r", "3")
    assert (
        run_cli("convert", tmp_path / "dora", "--to", "peft", "-o", tmp_path / "lora", *common).exit_code == 0
    )
    result = run_cli("convert", tmp_path / "dora", "--to", "gguf", "-o", tmp_path / "a.gguf", *common)
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    baked = load_adapter(tmp_path / "lora")
    for module in MODULES:
        name = gguf_names.gguf_name(f"{module}.weight")
        b, a = tensors[f"{name}.lora_b"], tensors[f"{name}.lora_a"]
        delta = alpha / b.shape[1] * b @ a  # what llama.cpp adds
        if ".attn_q." in name:  # llama.cpp permutes q rows like its base GGUF (4 heads in the fixture)
            delta = gguf_names.unpermute_qk(delta, 4)
        expected = baked.delta(module)
        # float32 B·A in llama.cpp's layout vs ours: the same products in another order
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_kohya_dora_file_merges_like_the_peft_adapter(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    write_dora(tmp_path / "dora", fixtures_dir)
    out = tmp_path / "k.safetensors"
    assert run_cli("convert", tmp_path / "dora", "--to", "kohya", "-o", out).exit_code == 0
    scales = {k: v for k, v in load_file(str(out)).items() if k.endswith(".dora_scale")}
    assert len(scales) == 2 and all(v.shape[1] == 1 for v in scales.values())  # LyCORIS' (out, 1)
    for adapter, folder in ((tmp_path / "dora", "from-peft"), (out, "from-kohya")):
        result = run_cli("merge", fixtures_dir / "base", adapter, "-o", tmp_path / folder)
        assert result.exit_code == 0, result.output
    peft_merged, kohya_merged = (
        open_checkpoint(tmp_path / "from-peft"),
        open_checkpoint(tmp_path / "from-kohya"),
    )
    for name in peft_merged.names():  # the same factors, alpha and magnitudes: the same float32 math
        torch.testing.assert_close(kohya_merged.get(name), peft_merged.get(name), **TOL[torch.float32])
