"""Shared benchmark helpers: a deterministic Llama-shaped checkpoint pair and measured subprocess runs.

Benchmarks compare loratools with the tools users would pick instead, in the same run, and report
ratios (these machines are shared and noisy) plus each run's peak resident memory.

    from benchmarks.common import make_llama_pair, run_measured
    base, finetuned = make_llama_pair(Path("/tmp/loratools-bench"), layers=12)   # ≈0.66 B, bf16, 3 shards
    m = run_measured(["loratools", "extract", str(base), str(finetuned), "-r", "16", "-o", "out"])
    print(m.wall_s, m.peak_rss_mb)
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import CheckpointWriter, plan_shards

ROOT = Path(__file__).resolve().parent.parent
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    """One measured command: wall time, the peak RSS of its process tree's largest member, output."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Measurement:
        if self.returncode != 0:
            raise RuntimeError(f"command failed ({self.returncode}):\n{self.stderr[-3000:]}")
        return self


# A process's ru_maxrss starts at the high-water mark of the memory it was exec'd from (Linux keeps
# it across exec), so a command started straight from this (large, torch-importing) process would
# report at least our own peak. A small launcher forks it from a fresh address space instead and
# reports the command's own peak RSS through a pipe.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())
code = os.waitstatus_to_exitcode(status)
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Measurement:
    """Run ``cmd`` in its own process; wall time and peak RSS (from wait4's rusage) of that process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        read_end, write_end = os.pipe()
        start = time.perf_counter()
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *cmd]
        proc = subprocess.Popen(
            launcher,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            pass_fds=(write_end,),
        )
        os.close(write_end)
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        with os.fdopen(read_end) as pipe:
            peak_kib = int(pipe.read() or 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measurement(
            wall_s=wall,
            peak_rss_mb=peak_kib / 1024,  # Linux reports KiB
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
    }  # fmt: skip


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in Hugging Face's order."""
    h, v = config["hidden_size"], config["vocab_size"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    shapes = _shapes(config)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs.append((f"{p}.input_layernorm.weight", (h,)))
        specs += [(f"{p}.{name}.weight", shapes[name]) for name in LINEARS]
        specs.append((f"{p}.post_attention_layernorm.weight", (h,)))
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def planted_delta(
    shape: tuple[int, int], gen: torch.Generator, signal_rank: int, noise_rank: int
) -> torch.Tensor:
    """ΔW = U_s diag(σ_s) V_sᵀ + U_n diag(σ_n) V_nᵀ (out, in), float32.

    The signal has ``signal_rank`` singular values from 2.0 down to 0.5; the noise ``noise_rank``
    values decaying as 0.25·j^-0.5 — so rank ``signal_rank`` keeps most, not all, of the energy.
    bf16 storage adds its own flat rounding floor on top.
    """
    out_f, in_f = shape
    s_signal = torch.linspace(2.0, 0.5, signal_rank)
    s_noise = 0.25 * torch.arange(1, noise_rank + 1, dtype=torch.float32) ** -0.5
    s = torch.cat([s_signal, s_noise])
    u = torch.randn(out_f, s.numel(), generator=gen) / out_f**0.5  # ≈ orthonormal columns
    v = torch.randn(in_f, s.numel(), generator=gen) / in_f**0.5
    return (u * s) @ v.T


def make_llama_pair(
    root: Path,
    *,
    layers: int = 12,
    hidden: int = 2048,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
    signal_rank: int = 16,
    noise_rank: int = 64,
    max_shard_mb: int = 500,
    seed: int = 0,
    dense_noise: float = 0.0,
) -> tuple[Path, Path]:
    """Write (or reuse) ``root/base`` and ``root/finetuned``: bf16, sharded, Llama-shaped.

    The defaults are TinyLlama's shapes with 12 layers: ≈0.66 B parameters, ≈1.3 GB per checkpoint
    in 3 shards. Every block linear of the fine-tune differs by ``0.1 · planted_delta``; norms and
    embeddings are identical. With ``dense_noise`` > 0 each fine-tuned linear also gets dense
    Gaussian noise of standard deviation ``dense_noise · in^-0.5`` (that fraction of the weights'
    own scale: full rank, as real fine-tunes are). Deterministic for a given seed. Written tensor
    by tensor, never the whole model in memory (``scale_7b`` writes a Llama-2-7B-shaped pair with
    it). Safe to call from several processes at once (a lock file serialises the writers; the
    second caller reuses the first one's files).
    """
    config = llama_config(layers, hidden, intermediate, heads, kv_heads, vocab)
    recipe = {
        **config,
        "signal_rank": signal_rank,
        "noise_rank": noise_rank,
        "seed": seed,
        "shard": max_shard_mb,
    }
    if dense_noise:  # only then: the recipe of existing pairs stays what it was (no rewrite)
        recipe["dense_noise"] = dense_noise
    base_dir, ft_dir = root / "base", root / "finetuned"
    marker = root / "recipe.json"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
            marker.unlink(missing_ok=True)
            _write_pair(base_dir, ft_dir, config, signal_rank, noise_rank, max_shard_mb, seed, dense_noise)
            marker.write_text(json.dumps(recipe))
    return base_dir, ft_dir


def _write_pair(
    base_dir: Path,
    ft_dir: Path,
    config: dict,
    signal_rank: int,
    noise_rank: int,
    max_shard_mb: int,
    seed: int,
    dense_noise: float = 0.0,
) -> None:
    specs = [TensorSpec(name, shape, torch.bfloat16) for name, shape in tensor_specs(config)]
    layout = plan_shards(specs, max_shard_mb * 1_000_000)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(base_dir, layout) as base_w, CheckpointWriter(ft_dir, layout) as ft_w:
        for name, shape in tensor_specs(config):
            if len(shape) == 1:
                w = 1 + 0.05 * torch.randn(shape, generator=gen)
            else:
                w = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
            base_w.write(name, w.bfloat16())
            if any(f".{linear}." in name for linear in LINEARS):
                w = w + planted_delta(shape, gen, signal_rank, noise_rank) * 0.1
                if dense_noise:
                    w += torch.randn(shape, generator=gen) * (dense_noise * shape[-1] ** -0.5)
            ft_w.write(name, w.bfloat16())
            del w
    for folder in (base_dir, ft_dir):
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def machine_note() -> str:
    """One line describing where the numbers were taken."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
