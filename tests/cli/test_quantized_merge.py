"""``loratools merge`` into quantized bases (GGUF, bitsandbytes, FP8): a float output equal to
dequant(W0) + Δ, ``--keep-quantization`` outputs read back by the reference readers, and the
survival report on an update known to vanish."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loratools.formats import gguf as gguf_names
from loratools.io.adapter_dir import load_adapter
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.merge import TensorUpdate, stacked_factors
from tests.cli.test_merge_cli import make_adapter, ok_json, refused
from tests.io.test_gguf_io import write_gguf_model
from tests.llama_cpp import LLAMA_BIN
from tests.tolerances import BF16_ROUNDING

gguf = pytest.importorskip("gguf")

Q0 = "model.layers.0.self_attn.q_proj"
ADAPTED = [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")]


def expected_merge(base: Path, adapter: Path, name: str) -> torch.Tensor:
    """dequant(W0) + s·B·A with the merge's own float32 arithmetic: one addmm into a float32 copy."""
    module = load_adapter(adapter).weights[name.removesuffix(".weight")]
    left, right = stacked_factors(TensorUpdate(loras=[(module, 1.0, False)]))
    return open_checkpoint(base).get(name).to(torch.float32, copy=True).addmm_(left, right)


def assert_merge_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """dequant(W0) + L @ R computed the same way in float32. The addmm may be blocked differently
    by BLAS with another thread count (the merge sets its own), so allow a few float32 ulp of the
    result (2⁻²¹ relative) instead of demanding the same bits."""
    # a few float32 ulps: another BLAS blocking, see above
    torch.testing.assert_close(actual, expected, rtol=2**-21, atol=1e-7, msg=name)


def assert_q8_0_of(data: np.ndarray, want: np.ndarray) -> None:
    """Q8_0 blocks equal to Q8_0(want), up to what a few float32 ulps of ``want`` can flip.

    ``want`` = W0 + Δ may differ from the merge's by a few ulps (another BLAS blocking, see
    assert_merge_equal), and a value within an ulp of a half-step then rounds to the neighbouring
    int8 (an ulp is ≤ 2⁻²³·127 ≈ 1.5e-5 of a step d = max|block| / 127: ~1 value in 10⁴ per ulp); a
    block's d (float16) may also round one float16 ulp apart, which moves a value by ≤ 127·2⁻¹⁰ ≈ 0.12 d.
    So: every value within 1.25 d of Q8_0(want), and at least 99% of them identical. A Δ off by 0.3%
    of itself (Δ is ~24% of ‖W0‖ here) already changes far more than 1% of the values."""
    qtype = gguf.GGMLQuantizationType.Q8_0
    ours = gguf.quants.dequantize(data, qtype).reshape(-1, 32)
    theirs = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype).reshape(-1, 32)
    step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert bool((np.abs(ours - theirs) <= 1.25 * step).all())  # one step, + d's float16 rounding
    assert float(np.mean(ours == theirs)) >= 0.99  # ulp-level flips are rare (see the docstring)


# -- GGUF --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_float_merge_into_gguf_is_dequant_plus_delta(
    run_cli, fixtures_dir: Path, tmp_path: Path, qtype: str
) -> None:
    base = tmp_path / "base.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype=qtype)
    out = tmp_path / "merged.safetensors"
    ok_json(run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--json"))
    merged = open_checkpoint(out)
    for name in ADAPTED:  # same float32 arithmetic on the same inputs
        assert_merge_equal(merged.get(name), expected_merge(base, fixtures_dir / "adapter", name), name)
    assert torch.equal(merged.get("model.norm.weight"), open_checkpoint(base).get("model.norm.weight"))


def gguf_tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_keep_quantization_gguf_round_trips(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base, out = tmp_path / "base.gguf", tmp_path / "merged.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q8_0")
    report = ok_json(
        run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--keep-quantization", "--json")
    )
    source, merged = gguf_tensors(base), gguf_tensors(out)
    assert list(merged) == list(source)
    assert all(merged[n].tensor_type == source[n].tensor_type for n in source)
    src_kv, out_kv = gguf.GGUFReader(str(base)).fields, gguf.GGUFReader(str(out)).fields
    assert {k: f.contents() for k, f in src_kv.items() if not k.startswith("GGUF.")} == {
        k: f.contents() for k, f in out_kv.items() if not k.startswith("GGUF.")
    }
    for name, t in source.items():
        changed = name.startswith(("blk.0.attn_q", "blk.0.attn_v", "blk.1.attn_q", "blk.1.attn_v"))
        assert np.array_equal(merged[name].data, t.data) != changed, name  # only adapted tensors change
    # the adapted q tensor is Q8_0(W0 + Δ) in llama.cpp's row order
    heads = 4
    want = gguf_names.permute_qk(expected_merge(base, fixtures_dir / "adapter", f"{Q0}.weight"), heads)
    assert_q8_0_of(merged["blk.0.attn_q.weight"].data, want.numpy())
    modules = {m["name"]: m for m in report["modules"]}
    # Q8_0 keeps 8 bits per weight: an update of 10-40% of ‖W0‖ survives nearly whole
    assert all(0.9 < m["survival"] < 1.1 and m["direction"] > 0.99 for m in modules.values())
    assert not any("LOST" in w for w in report["warnings"])


def test_tiny_update_into_q4_vanishes_and_is_reported(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    base, out = tmp_path / "base.gguf", tmp_path / "merged.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q4_0")
    adapter = make_adapter(tmp_path / "tiny", {Q0: (32, 32)}, scale=3e-3)  # ‖Δ‖/‖W0‖ ≈ 1e-4
    result = run_cli("merge", base, adapter, "-o", out, "--keep-quantization", "--json")
    report = ok_json(result)
    (module,) = report["modules"]
    # Q4_0's step is max|w|/8 per 32 weights: Δ ≈ 1e-4·|W0| moves almost no weight across a step
    assert module["survival"] * module["direction"] < 0.5 and module["lost_fraction"] > 0.5
    assert "MOST OF THE UPDATE IS LOST" in result.stderr and f"{Q0}.weight" in result.stderr
    assert "MOST OF THE UPDATE IS LOST" in report["warnings"][-1]


def test_keep_quantization_refusals(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    refused(
        run_cli(
            "merge",
            fixtures_dir / "base",
            fixtures_dir / "adapter",
            "-o",
            tmp_path / "o",
            "--keep-quantization",
        ),
        "not a quantized checkpoint",
    )
    base = tmp_path / "base.gguf"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q8_0")
    refused(
        run_cli(
            "merge", base, fixtures_dir / "adapter", "-o", tmp_path / "o.safetensors", "--keep-quantization"
        ),
        "o.gguf",
    )
    refused(
        run_cli(
            "merge",
            base,
            fixtures_dir / "adapter",
            "-o",
            tmp_path / "o.gguf",
            "--keep-quantization",
            "--dtype",
            "bfloat16",
        ),
        "drop --dtype",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


# -- bitsandbytes and FP8 safetensors ---------------------------------------------------------------
def quantized_copy(fixtures_dir: Path, folder: Path, kind: str) -> Path:
    """The fixture model with every 2-D weight but the embeddings quantized as ``kind``, config included."""
    shutil.copytree(fixtures_dir / "base", folder)
    ckpt = open_checkpoint(fixtures_dir / "base")
    tensors, config = {}, json.loads((folder / "config.json").read_text())
    for name in ckpt.names():
        w = ckpt.get(name)
        if w.ndim != 2 or "embed" in name:
            tensors[name] = w
        elif kind == "nf4":
            F = pytest.importorskip("bitsandbytes.functional")
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            tensors[name] = packed
            tensors |= {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}
            config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        else:  # FP8 with 128×128 block scales, DeepSeek-V3 style
            scale = torch.full((1, 1), float(w.abs().max()) / 448.0)
            tensors[name] = (w / scale).to(torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = scale
            config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bnb_reference_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own torch implementation of dequantize_4bit (its "default" backend). Its CPU
    C kernel (0.50.2) mis-indexes absmax when a row is shorter than the block (here 32 < 64)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    F = pytest.importorskip("bitsandbytes.functional")
    absmax = (
        F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    )
    code = _get_4bit_code(state.quant_type, packed.device)
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not compiled
    return compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_float_merge_into_quantized_safetensors(
    run_cli, fixtures_dir: Path, tmp_path: Path, kind: str
) -> None:
    base = quantized_copy(fixtures_dir, tmp_path / "base", kind)
    out = tmp_path / "out"
    ok_json(run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--json"))
    merged = open_checkpoint(out)
    assert not merged.quantized and sorted(merged.names()) == sorted(
        open_checkpoint(fixtures_dir / "base").names()
    )
    for name in ADAPTED:
        assert_merge_equal(merged.get(name), expected_merge(base, fixtures_dir / "adapter", name), name)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_keep_quantization_safetensors(run_cli, fixtures_dir: Path, tmp_path: Path, kind: str) -> None:
    base = quantized_copy(fixtures_dir, tmp_path / "base", kind)
    out = tmp_path / "out"
    report = ok_json(
        run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--keep-quantization", "--json")
    )
    source, merged = open_checkpoint(base), open_checkpoint(out)
    assert {n: (i.shape, i.dtype) for n, i in merged.stored.items()} == {
        n: (i.shape, i.dtype) for n, i in source.stored.items()
    }
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    for name in source.names():
        if name not in ADAPTED:
            assert torch.equal(merged.get(name), source.get(name)), name
    survival = {m["name"]: m["survival"] * m["direction"] for m in report["modules"]}
    assert sorted(survival) == sorted(ADAPTED)
    if kind == "nf4":  # what bitsandbytes itself reads from the output
        F = pytest.importorskip("bitsandbytes.functional")
        name = ADAPTED[0]
        parts = {k.removeprefix(f"{name}."): merged.read_stored(k) for k in merged.quantized[name].parts[1:]}
        state = F.QuantState.from_dict(parts, torch.device("cpu"))
        assert torch.equal(bnb_reference_dequant(merged.read_stored(name), state), merged.get(name))
    else:  # e4m3 rounds by ≤ 2⁻⁴ relative: an update of 10-40% of ‖W0‖ survives mostly
        assert all(0.8 < s < 1.2 for s in survival.values())


def test_unmerge_from_a_quantized_merge_reports_its_error(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    base, merged, out = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "unmerged.safetensors"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q8_0")
    adapter = fixtures_dir / "adapter"
    ok_json(run_cli("merge", base, adapter, "-o", merged, "--keep-quantization", "--json"))
    result = run_cli("unmerge", merged, adapter, "-o", out, "--json")
    report = ok_json(result)
    assert "exact only up to its quantization" in result.stderr
    original, unmerged = open_checkpoint(base), open_checkpoint(out)
    for module in report["modules"]:
        name = module["name"]
        delta = float(torch.linalg.vector_norm(expected_merge(base, adapter, name) - original.get(name)))
        actual = float(torch.linalg.vector_norm(unmerged.get(name) - original.get(name))) / delta
        # the estimate ‖Q(W) − W‖ is the rounding of a matrix like the merged one: the same size as
        # the rounding actually left behind, within a factor 2 (Q8_0 rounding is near-uniform noise)
        assert 0.5 * actual < module["quantization_error"] < 2 * actual, name
        assert 0 < actual < 0.1  # Q8_0: the removal is far from exact zero error, and far from useless


# -- llama.cpp as the judge -------------------------------------------------------------------------


def perplexity(model: Path, text: Path, lora: Path | None = None) -> float:
    """llama-perplexity on ``text`` (8 chunks of 32 tokens, 2 threads), computed from the log-probabilities
    it saves with ``--kl-divergence-base`` rather than read from its log.

    llama.cpp logs from a background thread that can drop its last lines at exit (a few runs in a hundred
    on a busy 2-core machine, the final estimate with them); the logits file is written by the main thread
    and closed before exit. Its layout: ``_logits_``, n_ctx, n_vocab, n_chunk (int32), the chunks' tokens
    (int32), then per chunk one record per scored position (the second half of the window): two float32
    (scale, min log-prob) and n_vocab uint16 q, log p(t) = scale·q[t] + min. PPL = exp(mean −log p(next)).
    The uint16 rounding moves log p by at most scale/2 ≈ 1.2e-4, far below what the test compares."""
    logits = text.with_name(f"{model.stem}-{lora.stem if lora else 'base'}.logits")
    args = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "32"]
    args += ["--chunks", "8", "-t", "2", "--kl-divergence-base", str(logits)]
    args += ["--lora", str(lora)] if lora else []
    done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    data = logits.read_bytes()
    assert data[:8] == b"_logits_", "llama-perplexity wrote no logits file"
    n_ctx, n_vocab, n_chunk = np.frombuffer(data, np.int32, 3, offset=8).tolist()
    tokens = np.frombuffer(data, np.int32, n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    first, width = n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    records = np.frombuffer(data, np.uint16, offset=20 + tokens.nbytes).reshape(
        n_chunk, n_ctx - 1 - first, width
    )
    scale_min = records[..., :4].copy().view(np.float32)  # (n_chunk, positions, 2)
    targets = tokens[:, first + 1 :]  # the token each scored position predicts
    q = np.take_along_axis(records[..., 4:], targets[..., None].astype(np.int64), axis=-1)[..., 0]
    log_p = scale_min[..., 0] * q + scale_min[..., 1]
    return float(np.exp(-log_p.astype(np.float64).mean()))


@pytest.mark.slow  # five llama-perplexity runs: 2 s on a quiet machine, 9 s on a busy one
@pytest.mark.skipif(
    not (LLAMA_BIN / "llama-perplexity").is_file(), reason="no llama.cpp build in ../shared/tools"
)
def test_llama_cpp_perplexity_of_merged_and_adapter_on_q8_base(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    """The float reference is llama.cpp's own F32 base + the GGUF adapter. A Q8_0 merge written by
    loratools, and the adapter on the Q8_0 base, must land within the quantization's noise of it:
    3 × |PPL(Q8_0 base) − PPL(F32 base)|, while the adapter itself moves PPL by more than that."""
    text = tmp_path / "text.txt"
    rng = random.Random(0)  # words made of the tiny vocabulary's tokens ("a", "b", "ab", "Ġ")
    text.write_text(" ".join(rng.choice(["ab", "a", "b", "ab ab"]) for _ in range(700)))
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    write_gguf_model(fixtures_dir / "base", f32, qtype="F32", bpe_vocab=True)
    write_gguf_model(fixtures_dir / "base", q8, qtype="Q8_0", bpe_vocab=True)
    adapter, merged = tmp_path / "adapter.gguf", tmp_path / "merged.gguf"
    ok_json(
        run_cli("convert", fixtures_dir / "adapter", "--to", "gguf", "--base", f32, "-o", adapter, "--json")
    )
    ok_json(run_cli("merge", q8, fixtures_dir / "adapter", "-o", merged, "--keep-quantization", "--json"))
    base_f32, base_q8 = perplexity(f32, text), perplexity(q8, text)
    reference = perplexity(f32, text, lora=adapter)
    noise = abs(base_q8 - base_f32)
    assert abs(reference - base_f32) > 3 * noise  # the adapter's effect stands out of the noise
    assert abs(perplexity(merged, text) - reference) <= 3 * noise
    assert abs(perplexity(q8, text, lora=adapter) - reference) <= 3 * noise


def test_float_merge_of_a_gguf_base_into_a_folder_has_a_config(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    base, out = tmp_path / "base.gguf", tmp_path / "merged"
    write_gguf_model(fixtures_dir / "base", base, qtype="Q8_0")
    ok_json(run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--dtype", "bfloat16", "--json"))
    config = json.loads((out / "config.json").read_text())
    original = json.loads((fixtures_dir / "base" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")} == {
        k: original[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")
    }
    merged = open_checkpoint(out)
    assert merged.info(f"{Q0}.weight").dtype == torch.bfloat16
    expected = expected_merge(base, fixtures_dir / "adapter", f"{Q0}.weight")
    # the float32 sums may differ in the last bits (BLAS blocking) and so tip a bf16 rounding: compare
    # with the float32 sum itself, one rounding away (against expected.bfloat16() a tipped rounding is
    # a full bf16 ulp, up to 2⁻⁷·|x|, which the former rtol=2⁻⁸ did not allow)
    torch.testing.assert_close(merged.get(f"{Q0}.weight").float(), expected, **BF16_ROUNDING)


def test_sharded_quantized_base_gets_a_fresh_index(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    """A sharded nf4 base merged to float: the output index names the plain tensors only (no
    absmax/quant_state parts) and counts their float bytes, where the source index is stale."""
    single = quantized_copy(fixtures_dir, tmp_path / "single", "nf4")
    tensors = open_checkpoint(single).stored
    names = list(tensors)
    base = tmp_path / "base"
    shutil.copytree(single, base)
    (base / "model.safetensors").unlink()
    reader = open_checkpoint(single)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, part in halves.items():
        save_file({n: reader.read_stored(n) for n in part}, base / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    ok_json(run_cli("merge", base, fixtures_dir / "adapter", "-o", out, "--json"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    plain = open_checkpoint(fixtures_dir / "base")
    assert sorted(index["weight_map"]) == sorted(plain.names())
    assert index["metadata"]["total_size"] == sum(plain.info(n).nbytes for n in plain.names())
    merged = open_checkpoint(out)
    assert_merge_equal(
        merged.get(ADAPTED[0]), expected_merge(base, fixtures_dir / "adapter", ADAPTED[0]), ADAPTED[0]
    )
