"""Scale: extract and merge on a Llama-2-7B-shaped bf16 pair, cold and warm, against the I/O floor.

    python -m benchmarks.scale_7b make  [--root /tmp/loratools-bench-7b] [--layers 32]
    python -m benchmarks.scale_7b run   [--root /tmp/loratools-bench-7b] [--skip extract merge]
    python -m benchmarks.scale_7b peers [--root /tmp/loratools-bench-7b] [--layers 2] [--mergekit PATH]
    python -m benchmarks.scale_7b clean [--root /tmp/loratools-bench-7b]

``make`` writes the pair with :func:`benchmarks.common.make_llama_pair` (tensor by tensor, never
the whole model in memory): Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, 32 layers,
vocab 32000), bf16, 2 GB shards, 13.5 GB per checkpoint; every block linear of the fine-tune is
the base + 0.1 · a planted rank-16 signal with a decaying rank-64 tail + dense noise at 0.1% of
the weights' scale. ``run`` measures, each in its own process and in the same run:

- the floors: ``import torch`` (start-up), then read every input byte (64 MB ``readinto``
  through one buffer) and write every output byte (the same number of bytes as the tool's
  output, 64 MB writes) — extract: both checkpoints in, an adapter-sized file out; merge: the
  base and the adapter in, a base-sized checkpoint out;
- ``loratools extract BASE FT -r 16`` and ``loratools merge BASE ADAPTER`` (r = 16 on every
  block linear);

cold (``sync``, then every input file dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` before the run) and warm (every input file read just before
the run; the extract pair is larger than this machine's memory, so "warm" is only as warm as the
page cache can hold). Each run reports wall time, user and system CPU, minor page faults and
peak RSS (``wait4``'s rusage of the process itself). ``peers`` runs mergekit-extract-lora and
PEFT's merge on the same shapes truncated to ``--layers`` layers (they hold whole matrices or the
whole model: at 32 layers mergekit took 45 minutes and PEFT needs the 13.5 GB model resident).
Results go to ``benchmarks/results/scale_7b.md`` (``run``) and ``scale_7b_peers.md`` (``peers``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT, machine_note, markdown_table

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000}
SHARD_MB = 2000
DENSE_NOISE = 1e-3
RANK = 16


def make_pair(root: Path, layers: int) -> tuple[Path, Path]:
    """The 7B-shaped pair under ``root`` (written once, reused after)."""
    from benchmarks.common import make_llama_pair

    return make_llama_pair(root, layers=layers, max_shard_mb=SHARD_MB, dense_noise=DENSE_NOISE, **LLAMA2_7B)


def evict(paths: list[Path]) -> None:
    """Drop every file under ``paths`` from the page cache (no root needed): written-back pages
    only, hence the ``sync`` first."""
    os.sync()
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (into the page cache, as far as it holds them)."""
    buffer = bytearray(64 << 20)
    for path in _files(paths):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return out


def size_of(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in _files(paths))


# The floor: start-up (python + import torch), read every input byte, write N output bytes.
FLOOR = """
import os, sys, torch
from pathlib import Path
out, size, inputs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
drop = os.environ.get("FLOOR_DROP_BEHIND") == "1"
buffer = bytearray(64 << 20)
view = memoryview(buffer)
for root in inputs:
    root = Path(root)
    for item in sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()):
        with open(item, "rb", buffering=0) as f:
            done = 0
            while n := f.readinto(buffer):
                if drop:
                    os.posix_fadvise(f.fileno(), done, n, os.POSIX_FADV_DONTNEED)
                done += n
out.mkdir(parents=True)
with open(out / "floor.bin", "wb", buffering=0) as f:
    done = 0
    while size > 0:
        n = f.write(view[: min(size, len(buffer))])
        if drop:  # start this chunk's writeback, drop the previous one (written back by now)
            os.posix_fadvise(f.fileno(), done, n, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(f.fileno(), max(done - len(buffer), 0), min(done, len(buffer)), os.POSIX_FADV_DONTNEED)
        size -= n
        done += n
"""

# Forks the command from a small fresh process and prints its own rusage (Linux keeps ru_maxrss
# across exec, so starting it from this torch-importing process would report our peak too).
LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, u = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(f"@@rusage {os.waitstatus_to_exitcode(status)} {wall} {u.ru_utime} {u.ru_stime} {u.ru_minflt} {u.ru_majflt} {u.ru_maxrss}", file=sys.stderr)
"""


@dataclass(frozen=True)
class Run:
    label: str
    cache: str
    wall_s: float
    user_s: float
    sys_s: float
    minflt: int
    majflt: int
    peak_rss_mb: float
    load: str

    def row(self, floor: Run | None) -> list[object]:
        ratio = f"{self.wall_s / floor.wall_s:.2f}" if floor is not None else "1.00"
        return [self.label, self.cache, f"{self.wall_s:.1f}", ratio, f"{self.user_s:.1f}", f"{self.sys_s:.1f}",
                f"{self.minflt / 1000:.0f}k", f"{self.peak_rss_mb:.0f}", self.load]  # fmt: skip


def measure(label: str, cache: str, cmd: list[str], env: dict[str, str] | None = None) -> Run:
    import subprocess

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"[{time.strftime('%H:%M:%S')}] {label} ({cache}), load {load}: {' '.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)  # fmt: skip
    line = proc.stderr.strip().splitlines()[-1].split()
    if line[0] != "@@rusage" or line[1] != "0":
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    wall, user, system = (float(x) for x in line[2:5])
    run = Run(label, cache, wall, user, system, int(line[5]), int(line[6]), int(line[7]) / 1024, load)
    print(f"    {run.row(None)}", file=sys.stderr, flush=True)
    return run


# The floor again, doing I/O as loratools does past a quarter of the machine's memory: each chunk
# dropped from the page cache once read or written (loratools.io.cache)
DROPPING = "floor, I/O dropped behind"

COLUMNS = ["run", "page cache", "wall s", "× floor (same cache)", "user s", "sys s", "minor faults",
           "peak RSS MB", "load avg (1, 5, 15 min) at start"]  # fmt: skip


def loratools(*args: str) -> list[str]:
    return [sys.executable, "-m", "loratools.cli.main", *args]


def run_scale(args: argparse.Namespace) -> None:
    from benchmarks.bench_merge import make_adapter

    base, ft = make_pair(args.root, args.layers)
    adapter = make_adapter(base, args.root / f"adapter-r{RANK}", RANK)
    work = args.root / "outputs"
    rows: list[list[object]] = []
    notes = []
    for op in ("extract", "merge"):
        if op in args.skip:
            continue
        inputs = [base, ft] if op == "extract" else [base, adapter / "adapter_model.safetensors"]
        out = work / op
        tool = (
            loratools("extract", str(base), str(ft), "-r", str(RANK), "-o", str(out), "-q")
            if op == "extract"
            else loratools("merge", str(base), str(adapter), "-o", str(out), "-q")
        )
        output_bytes = None
        for cache in args.cache:
            for _ in range(args.repeat):
                pair: dict[str, Run] = {}
                labels = ("floor", DROPPING, "loratools")
                for label in labels if output_bytes is not None else ("loratools", *labels[:2]):
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir(parents=True)
                    cmd = tool if label == "loratools" else [
                        sys.executable, "-c", FLOOR, str(out), str(output_bytes), *map(str, inputs)]  # fmt: skip
                    evict([*inputs]) if cache == "cold" else warm([*inputs])
                    os.sync()
                    env = {"FLOOR_DROP_BEHIND": "1"} if label == DROPPING else None
                    pair[label] = measure(f"{op}: {label}", cache, cmd, env)
                    if label == "loratools":
                        output_bytes = size_of([out])
                rows += [pair["floor"].row(None), pair[DROPPING].row(pair["floor"]),
                         pair["loratools"].row(pair["floor"])]  # fmt: skip
        notes.append(f"{op}: inputs {size_of(inputs) / 1e9:.2f} GB, output {output_bytes / 1e9:.2f} GB")
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, rows, notes)


def run_peers(args: argparse.Namespace) -> None:
    """mergekit and PEFT beside loratools and the floor on the 7B shapes truncated to a few layers
    (warm page cache: the truncated pair fits in memory)."""
    from benchmarks.bench_merge import PEFT, make_adapter

    base, ft = make_pair(args.root / f"layers{args.layers}", args.layers)
    adapter = make_adapter(base, args.root / f"layers{args.layers}" / f"adapter-r{RANK}", RANK)
    work = args.root / f"layers{args.layers}" / "outputs"
    rows: list[list[object]] = []
    notes = []
    ops = {
        "extract": ([base, ft], {
            "loratools": loratools("extract", str(base), str(ft), "-r", str(RANK), "-o", "{out}", "-q"),
            "mergekit-extract-lora": [args.mergekit, "--model", str(ft), "--base-model", str(base),
                                      "--out-path", "{out}", "--max-rank", str(RANK)],
        }),
        "merge": ([base, adapter / "adapter_model.safetensors"], {
            "loratools": loratools("merge", str(base), str(adapter), "-o", "{out}", "-q"),
            "PEFT merge_and_unload + save_pretrained": [sys.executable, "-c", PEFT, str(base), str(adapter), "{out}"],
        }),
    }  # fmt: skip
    for op, (inputs, tools) in ops.items():
        if op in args.skip:
            continue
        runs: dict[str, Run] = {}
        for label, cmd in tools.items():
            if (label.startswith("mergekit") and "mergekit" in args.skip) or (
                label.startswith("PEFT") and "peft" in args.skip
            ):
                continue
            for _ in range(args.repeat if label == "loratools" else 1):
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                warm([*inputs])
                os.sync()
                run = measure(f"{op}: {label}", "warm", [c.replace("{out}", str(work / "out")) for c in cmd])
                if label not in runs or run.wall_s < runs[label].wall_s:
                    runs[label] = run
                if label == "loratools":
                    output_bytes = size_of([work / "out"])
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        warm([*inputs])
        os.sync()
        floor = measure(f"{op}: floor", "warm", [sys.executable, "-c", FLOOR, str(work / "out"), str(output_bytes),
                                                 *map(str, inputs)])  # fmt: skip
        rows.append(floor.row(None))
        rows += [run.row(floor) for run in runs.values()]
        notes.append(
            f"{op}: inputs {size_of(inputs) / 1e9:.2f} GB, loratools' output {output_bytes / 1e9:.2f} GB"
        )
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, rows, notes, peers=True)


def write_results(
    args: argparse.Namespace, rows: list[list[object]], notes: list[str], peers: bool = False
) -> None:
    what = "beside mergekit and PEFT, warm page cache" if peers else "cold and warm page cache"
    command = f"peers --layers {args.layers}" if peers else f"run --repeat {args.repeat}"
    text = f"""# scale: a Llama-2-7B-shaped pair ({args.layers} layers), {what}

{machine_note()}, {time.strftime("%H:%M UTC", time.gmtime())}; 24 GiB memory, shared with other jobs
(load average beside every row). {"; ".join(notes)}.

Command: `python -m benchmarks.scale_7b {command}`
(pair: `make_llama_pair` with Llama-2-7B's shapes, bf16, {SHARD_MB} MB shards, r = {RANK}).

**Floor** = start-up (python + `import torch`) + reading every input byte + writing every output
byte (as many bytes as the tool wrote), in one process, with the page cache in the same state as
the tool's run beside it (cold: `sync` and `posix_fadvise(DONTNEED)` on every input file first;
warm: every input file read just before — the extract pair, 27 GB, is larger than the machine's
memory, so its "warm" runs find only part of it cached). Floor and tool alternate; each row is one
process (`wait4` rusage: its own CPU time, faults and peak RSS). "{DROPPING}": the same floor
doing its I/O as loratools does past a quarter of the machine's memory (`loratools/io/cache.py`)
— each chunk dropped from the page cache once read, or once written back — so a pass larger than
the cache never waits on reclaim; its "× floor" is against the plain floor, and loratools'
against it is the ratio of their walls.

{markdown_table(COLUMNS, rows)}
"""
    out = ROOT / "benchmarks" / "results" / (args.out or ("scale_7b_peers.md" if peers else "scale_7b.md"))
    out.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["make", "run", "peers", "clean"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/loratools-bench-7b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cache", nargs="*", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["extract", "merge", "mergekit", "peft"])
    parser.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-extract-lora")
    parser.add_argument("--out", help="results file name in benchmarks/results/ (default by command)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.what == "make":
        print(make_pair(args.root, args.layers))
    elif args.what == "run":
        run_scale(args)
    elif args.what == "peers":
        run_peers(args)
    else:
        shutil.rmtree(args.root, ignore_errors=True)
    print(f"({args.what} took {time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
