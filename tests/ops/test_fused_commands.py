"""combine, resize, similarity, inspect and doctor on a fused-expert (PEFT ``target_parameters``)
adapter: with ``--base`` they read it and write what PEFT loads; without it they still refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loratools.adapter import Adapter, LoraWeight
from loratools.kinds.fused import ExpertLora, keep_layout
from tests._tolerances import LOGITS_FP32, TOL

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.ops.test_fused_experts import ALL_EXPERTS_TOUCHED, EXPERTS_MODULE, _saved  # noqa: E402

SLICES = [f"{EXPERTS_MODULE}.{p}[{e}]" for p in ("gate_up_proj", "down_proj") for e in range(3)]


def _read(adapter: Path, base: Path) -> Adapter:
    from loratools.io.adapter_dir import load_adapter
    from loratools.io.checkpoint import open_checkpoint

    shapes = {i.name: tuple(i.shape) for i in open_checkpoint(base).infos()}
    return load_adapter(adapter, base_shapes=shapes)


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    fresh = transformers.GptOssForCausalLM.from_pretrained(base).eval()
    model = peft.PeftModel.from_pretrained(fresh, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))).logits


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    base, adapter, _ = _saved(tmp_path)
    return base, adapter


@pytest.mark.parametrize("command", ["resize", "combine", "similarity", "inspect", "doctor"])
def test_without_a_base_the_refusal_names_the_fix(
    run_cli, saved: tuple[Path, Path], tmp_path: Path, command: str
) -> None:
    _, adapter = saved
    args = {
        "resize": ["resize", adapter, "-r", "1", "-o", tmp_path / "o"],
        "combine": ["combine", adapter, adapter, "-o", tmp_path / "o"],
        "similarity": ["similarity", adapter, adapter],
        "inspect": ["inspect", adapter],
        "doctor": ["doctor", adapter, "--json"],
    }[command]
    result = run_cli(*args)
    if command == "doctor":  # doctor reports a load error as a finding instead of failing
        assert "needs the base model" in result.output
    else:
        assert result.exit_code == 1 and "needs the base model" in result.stderr
    assert not (tmp_path / "o").exists()


def test_resize_with_base_is_each_experts_best_rank_1_and_loads_in_peft(
    run_cli, saved: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = saved
    result = run_cli("resize", adapter, "-r", "1", "-o", tmp_path / "r", "--base", base, "--json")
    assert result.exit_code == 0, result.output
    original, resized = _read(adapter, base), _read(tmp_path / "r", base)
    assert set(resized.weights) == set(SLICES) and all(
        isinstance(w, ExpertLora) for w in resized.weights.values()
    )
    for name in SLICES:
        s = torch.linalg.svdvals(original.delta(name).double())
        error = torch.linalg.matrix_norm((resized.delta(name) - original.delta(name)).double())
        # float32 factored SVD of rank-2 factors: Eckart–Young at rank 1, to float32 precision
        torch.testing.assert_close(error, s[1], rtol=1e-4, atol=1e-6)
    _peft_logits(base, tmp_path / "r")  # PEFT loads it


def test_resize_by_energy_pads_experts_to_one_rank_per_parameter(
    run_cli, saved: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = saved
    result = run_cli("resize", adapter, "--energy", "0.75", "-o", tmp_path / "r", "--base", base, "--json")
    assert result.exit_code == 0, result.output
    ranks = {m["name"]: m["rank"] for m in json.loads(result.stdout)["modules"]}
    assert len({ranks[n] for n in SLICES}) == 2  # the rule gave the experts rank 1 or 2
    kept = _read(tmp_path / "r", base)
    config = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert config["target_parameters"]
    fresh_logits = _peft_logits(base, tmp_path / "r")
    # PEFT's logits are those of our merge of the same adapter
    from loratools.commands.merge import merge_paths

    merge_paths(str(base), tmp_path / "m", add=[(str(tmp_path / "r"), 1.0)])
    merged = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        ours = merged(torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))).logits
    torch.testing.assert_close(ours, fresh_logits, **LOGITS_FP32)
    assert len(kept.weights) == 6


def test_combine_with_base_sums_the_experts(run_cli, saved: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = saved
    result = run_cli("combine", adapter, adapter, "-o", tmp_path / "c", "--base", base, "--json")
    assert result.exit_code == 0, result.output
    original, combined = _read(adapter, base), _read(tmp_path / "c", base)
    for name in SLICES:  # float32 sums of two equal products
        torch.testing.assert_close(combined.delta(name), 2 * original.delta(name), **TOL[torch.float32])
    _peft_logits(base, tmp_path / "c")


def test_similarity_inspect_and_doctor_read_it_with_base(run_cli, saved: tuple[Path, Path]) -> None:
    base, adapter = saved
    sim = run_cli("similarity", adapter, adapter, "--base", base, "--json")
    assert sim.exit_code == 0, sim.output
    phi = {m["name"]: m["phi"] for m in json.loads(sim.stdout)["modules"]}
    assert set(phi) == set(SLICES) and all(abs(p[0][0] - 1) < 1e-5 for p in phi.values())  # itself: φ = 1
    inspect = run_cli("inspect", adapter, "--base", base, "--json")
    assert inspect.exit_code == 0, inspect.output
    summary = json.loads(inspect.stdout)
    assert summary["experts"] == ALL_EXPERTS_TOUCHED
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as stored:  # one A, one B per parameter
        assert summary["tensors"] == len(list(stored.keys()))
    assert not any("[" in t for t in summary["target_modules"])  # parameters, not their expert slices
    doctor = run_cli("doctor", adapter, "--base", base, "--json")
    facts = json.loads(doctor.stdout)
    assert "needs the base model" not in doctor.output
    assert facts.get("load_error") is None
    findings = {f["rule"]: f for r in facts["runtimes"] for f in r["findings"]}
    # llama.cpp: no GGUF adapter for expert tensors, so merge (not convert --to gguf, which refuses them)
    assert findings["llama.cpp.fused_experts"]["severity"] == "blocker" and "llama.cpp.format" not in findings
    assert (
        "merge" in findings["llama.cpp.fused_experts"]["fix"]
        and len(findings["llama.cpp.fused_experts"]["modules"]) == 6
    )
    assert findings["vllm.fused_experts"]["effect"] == "unverified"


def test_keep_layout_pads_mixed_ranks_exactly() -> None:
    from loratools.kinds.fused import FusedParam

    param = FusedParam("x.experts.down_proj", (2, 4, 3), transposed=False)
    gen = torch.Generator().manual_seed(0)
    source = Adapter(
        {f"{param.name}[{e}]": ExpertLora(torch.randn(2, 3, generator=gen), torch.randn(4, 2, generator=gen), 2.0, param=param, expert=e) for e in range(2)}
    )  # fmt: skip
    made = Adapter(  # what an op returns: plain LoRAs of different ranks and scales
        {
            f"{param.name}[0]": LoraWeight(torch.randn(1, 3, generator=gen), torch.randn(4, 1, generator=gen), 3.0),
            f"{param.name}[1]": LoraWeight(torch.randn(2, 3, generator=gen), torch.randn(4, 2, generator=gen), 2.0, use_rslora=True),
        }
    )  # fmt: skip
    kept = keep_layout(made, [source])
    assert {(w.rank, w.alpha, w.use_rslora) for w in kept.weights.values()} == {(2, 2.0, False)}
    assert all(isinstance(w, ExpertLora) and w.param == param for w in kept.weights.values())
    for name in made.weights:  # zero padding and the folded scale: the same delta
        torch.testing.assert_close(kept.delta(name), made.delta(name), **TOL[torch.float32])
