"""Quantized-base merge benchmark: loratools merge (a) float and (b) --keep-quantization beside
llama.cpp's llama-export-lora, on GGUF bases quantized with llama-quantize, in one run.

    python -m benchmarks.bench_quantized_merge [--layers 2] [--rank 16] [--root /tmp/lt-qbench]

The base is make_llama_pair's (TinyLlama shapes, random weights; vocabulary cut to 512 so the GGUF
can carry a byte-level tokenizer), written as an F16 GGUF the way convert_hf_to_gguf does (names,
q/k permutation), then quantized with ``llama-quantize`` to each type. The adapter is rank r on
every block linear (bench_merge.make_adapter), converted with ``loratools convert --to gguf``.

Runs (each in its own process: wall time and its own peak RSS):
- ``loratools (a)``: ``loratools merge BASE.gguf ADAPTER -o OUT.safetensors --dtype float16``;
- ``loratools (b)``: ``loratools merge BASE.gguf ADAPTER -o OUT.gguf --keep-quantization``;
- ``export-lora``:   ``llama-export-lora -m BASE.gguf --lora ADAPTER.gguf -o OUT.gguf``.

Judged by llama.cpp itself (llama-perplexity on 16 chunks of 128 tokens of a fixed pseudo-random
text): perplexity, and the mean KL divergence and same-top-token rate of each model's next-token
distributions against the float reference, the F16 base with the adapter applied at run time.
The weights are random, so perplexities sit near the vocabulary size; the KL divergence is the
measure that matters. The F16 base without the adapter shows how large the adapter's own effect is.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_merge import make_adapter, measure
from benchmarks.common import ROOT, machine_note, make_llama_pair, markdown_table
from loratools.formats import gguf as names
from loratools.io.checkpoint import open_checkpoint

LLAMA = ROOT.parent / "shared" / "tools" / "llama.cpp" / "bin"
VOCAB = 512


def byte_tokens() -> list[str]:
    """GPT-2's byte → unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = dict(
        zip(
            printable + extra,
            [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))],
            strict=True,
        )
    )
    return [table[b] for b in range(256)]


def write_gguf(checkpoint: Path, out: Path, config: dict) -> None:
    """A Hugging Face Llama checkpoint as an F16 GGUF (2-D tensors F16, the rest F32), one tensor at a time."""
    import gguf

    ckpt = open_checkpoint(checkpoint)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(VOCAB)
    tokens = byte_tokens() + ["<s>", "</s>", "et"] + [f"<x{i}>" for i in range(VOCAB - 259)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3] + [1] * (VOCAB - 258))
    writer.add_token_merges(["e t"])  # llama.cpp's BPE loader needs at least one merge
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    heads = (config["num_attention_heads"], config["num_key_value_heads"])
    for name in ckpt.names():
        target = names.gguf_name(name)
        tensor = ckpt.get(name).float()
        n_head = names.qk_heads(str(target), *heads)
        if n_head:
            tensor = names.permute_qk(tensor, n_head)
        data = tensor.numpy()
        writer.add_tensor(str(target), data.astype(np.float16) if data.ndim == 2 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_perplexity(args: list[str]) -> str:
    """llama-perplexity's output; through a file, retried when llama.cpp's background logger lost the
    last lines at exit (it does on a busy machine)."""
    output = ""
    for _ in range(3):
        with tempfile.TemporaryFile("w+") as log:
            subprocess.run(
                [str(LLAMA / "llama-perplexity"), *args], stdout=log, stderr=subprocess.STDOUT, check=True
            )
            log.seek(0)
            output = log.read()
        if "Final estimate" in output or "Same top p" in output:
            return output
    raise RuntimeError(f"llama-perplexity printed no final estimate: {output[-2000:]}")


def judge(model: Path, text: Path, reference: Path, lora: Path | None = None) -> list[float]:
    """[perplexity, mean KL divergence from the reference's logits, same top token %] of ``model``."""
    args = ["-m", str(model), "-f", str(text), "-c", "128", "--chunks", "16", "-t", "2"]
    args += ["--kl-divergence-base", str(reference), "--kl-divergence"] + (
        ["--lora", str(lora)] if lora else []
    )
    output = llama_perplexity(args)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", output)
    kld = re.search(r"Mean\s+KLD:\s*([0-9.e+-]+)", output)
    top = re.search(r"Same top p:\s*([0-9.]+)", output)
    assert ppl and kld and top, output[-2000:]
    return [float(ppl.group(1)), float(kld.group(1)), float(top.group(1))]


def run(args: argparse.Namespace) -> str:
    import json

    root = args.root
    base, _ = make_llama_pair(root / "pair", layers=args.layers, vocab=VOCAB)
    config = json.loads((base / "config.json").read_text())
    adapter = make_adapter(base, root / f"adapter-r{args.rank}", args.rank)
    f16 = root / "base-F16.gguf"
    if not f16.is_file():
        write_gguf(base, f16, config)
    lora = root / "adapter.gguf"
    py = sys.executable
    subprocess.run([py, "-m", "loratools.cli.main", "convert", str(adapter), "--to", "gguf", "--base", str(f16),
                    "-o", str(lora), "--force", "-q"], check=True, cwd=ROOT)  # fmt: skip
    text = root / "text.txt"
    rng = random.Random(0)
    text.write_text(
        " ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 8))) for _ in range(3000))
    )
    reference = root / "reference.kld"  # F16 base + adapter at run time: the float reference's logits
    llama_perplexity(["-m", str(f16), "-f", str(text), "-c", "128", "--chunks", "16", "-t", "2", "--lora", str(lora),
                      "--kl-divergence-base", str(reference)])  # fmt: skip
    rows = [["F16 base, no adapter (the adapter's own effect)", "", "", "", *judge(f16, text, reference)]]
    for qtype in args.types:
        qbase = root / f"base-{qtype}.gguf"
        if not qbase.is_file():
            subprocess.run(
                [str(LLAMA / "llama-quantize"), str(f16), str(qbase), qtype], check=True, capture_output=True
            )
        rows.append([f"{qtype} base + adapter at run time", "", "", "", *judge(qbase, text, reference, lora)])
        outputs = {
            "loratools (a) float16": root / f"merged-{qtype}-a.safetensors",
            "loratools (b) --keep-quantization": root / f"merged-{qtype}-b.gguf",
            "llama-export-lora": root / f"merged-{qtype}-export.gguf",
        }
        cmds = {
            "loratools (a) float16": [py, "-m", "loratools.cli.main", "merge", str(qbase), str(adapter), "-o",
                                      str(outputs["loratools (a) float16"]), "--dtype", "float16", "--force", "-q"],
            "loratools (b) --keep-quantization": [py, "-m", "loratools.cli.main", "merge", str(qbase), str(adapter), "-o",
                                                  str(outputs["loratools (b) --keep-quantization"]), "--keep-quantization",
                                                  "--force", "-q"],
            "llama-export-lora": [str(LLAMA / "llama-export-lora"), "-m", str(qbase), "--lora", str(lora), "-o",
                                  str(outputs["llama-export-lora"]), "-t", "2"],
        }  # fmt: skip
        for label, cmd in cmds.items():
            wall, peak = measure(cmd)
            out = outputs[label]
            size = out.stat().st_size / 1e6
            if out.suffix == ".safetensors":  # judge the float output through an F16 GGUF of it
                judged = root / f"merged-{qtype}-a.gguf"
                write_gguf(out, judged, config)
                out = judged
            rows.append([f"{qtype}: {label}", wall, peak, size, *judge(out, text, reference)])
    columns = [
        "run",
        "wall s",
        "peak RSS MB",
        "output MB",
        "perplexity",
        "KLD vs reference",
        "same top token %",
    ]
    return markdown_table(columns, rows) + f"\n\n{machine_note()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/lt-qbench"))
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
