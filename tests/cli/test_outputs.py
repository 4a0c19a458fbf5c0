"""Outputs are what their names say, appear complete or not at all, and leave nothing behind
(issue 12 §2, §3, §5): merge/unmerge/swap and ``convert --to safetensors``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loratools.io.checkpoint import open_checkpoint
from tests.io.test_writer import SENTENCE_TRANSFORMERS_CARRIED, leftovers, sentence_transformers_folder


def refused(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


# -- merge: the output's name decides its shape --------------------------------------------------


def test_a_folder_base_merged_to_name_safetensors_is_one_file(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    base, adapter = fixtures_dir / "base", fixtures_dir / "adapter"
    result = ok(run_cli("merge", base, adapter, "-o", tmp_path / "m.safetensors", "--json"))
    assert (tmp_path / "m.safetensors").is_file()
    warning = [w for w in json.loads(result.stdout)["warnings"] if "single weights file" in w]
    assert len(warning) == 1 and "config.json" in warning[0] and "-o " in warning[0]
    ok(run_cli("merge", base, adapter, "-o", tmp_path / "folder", "-q"))
    # the same bytes as the folder's weights: only the container differs
    assert (tmp_path / "m.safetensors").read_bytes() == (
        tmp_path / "folder" / "model.safetensors"
    ).read_bytes()
    ok(run_cli("inspect", tmp_path / "m.safetensors"))
    assert leftovers(tmp_path) == []


def test_a_single_file_base_merged_to_a_plain_name_is_a_model_folder(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    base, adapter = fixtures_dir / "base" / "model.safetensors", fixtures_dir / "adapter"
    ok(run_cli("merge", base, adapter, "-o", tmp_path / "merged", "-q"))
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["model.safetensors"]
    ok(run_cli("merge", base, adapter, "-o", tmp_path / "merged.safetensors", "-q"))
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (
        tmp_path / "merged.safetensors"
    ).read_bytes()
    inspected = json.loads(ok(run_cli("inspect", tmp_path / "merged", "--json")).stdout)
    assert inspected["kind"] == "checkpoint" and inspected["tensors"] == len(open_checkpoint(base))
    # and back: unmerge and swap follow the same rule
    ok(run_cli("unmerge", tmp_path / "merged.safetensors", adapter, "-o", tmp_path / "unmerged", "-q"))
    assert (tmp_path / "unmerged" / "model.safetensors").is_file()
    args = ("--remove", adapter, "--add", adapter, "-o", tmp_path / "swapped.safetensors", "-q")
    ok(run_cli("swap", tmp_path / "merged", *args))
    assert (tmp_path / "swapped.safetensors").is_file()


def test_names_that_promise_another_shape_or_format_are_refused(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    adapter = fixtures_dir / "adapter"
    line = refused(
        run_cli("merge", fixtures_dir / "base-sharded", adapter, "-o", tmp_path / "m.safetensors"),
        "sharded",
        "-o m",
    )
    assert "base-sharded" in line
    for name in ("m.bin", "m.pt", "m.SAFETENSORS", "m.gguf"):
        refused(run_cli("merge", fixtures_dir / "base", adapter, "-o", tmp_path / name), "as safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_255_character_output_name_merges(run_cli, fixtures_dir: Path, tmp_path: Path) -> None:
    name = "m" * 243 + ".safetensors"
    ok(run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", tmp_path / name, "-q"))
    assert len(open_checkpoint(tmp_path / name)) == len(open_checkpoint(fixtures_dir / "base"))
    ok(run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", tmp_path / name[:-12], "-q"))
    assert (tmp_path / name[:-12] / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_an_output_made_by_another_run_meanwhile_is_not_replaced(
    run_cli, fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both runs passed the up-front check; the second to finish must fail, not replace the first."""
    from loratools.io.writer import CheckpointWriter

    out = tmp_path / "out"
    finish = CheckpointWriter.__exit__

    def other_run_finishes_first(self, *exc) -> None:
        finish(self, *exc)
        shutil.copytree(fixtures_dir / "base", out)

    monkeypatch.setattr(CheckpointWriter, "__exit__", other_run_finishes_first)
    refused(
        run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", out), "another run", "--force"
    )
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (fixtures_dir / "base" / name).read_bytes()
    assert leftovers(tmp_path) == []


# -- merge: a model folder comes along whole ---------------------------------------------------------


def test_merge_keeps_a_sentence_transformers_folder_whole(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    model = sentence_transformers_folder(tmp_path)
    shutil.copyfile(fixtures_dir / "base" / "model.safetensors", model / "model.safetensors")
    (model / "pytorch_model.bin").unlink()  # a stale second copy of the weights is never carried
    (model / "model.safetensors.index.json").unlink()
    report = json.loads(
        ok(run_cli("merge", model, fixtures_dir / "adapter", "-o", tmp_path / "out", "--json")).stdout
    )
    out = tmp_path / "out"
    carried = SENTENCE_TRANSFORMERS_CARRIED
    assert sorted(report["files"]) == carried
    for name in carried:
        assert (out / name).read_bytes() == (model / name).read_bytes()
    for module in json.loads((out / "modules.json").read_text()):
        assert (out / module["path"]).is_dir()  # every module the model lists is there
    assert (
        not (out / ".git").exists()
        and not (out / ".cache").exists()
        and not (out / ".gitattributes").exists()
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    ok(run_cli("inspect", out))


# -- convert --to safetensors: the same rule ---------------------------------------------------------


def test_convert_to_name_safetensors_writes_one_file_or_refuses(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    sharded = fixtures_dir / "base-sharded"
    result = ok(
        run_cli("convert", sharded, "--to", "safetensors", "-o", tmp_path / "one.safetensors", "--json")
    )
    report = json.loads(result.stdout)
    assert report["files"] == ["one.safetensors"] and any("config.json" in n for n in report["notes"])
    one, source = open_checkpoint(tmp_path / "one.safetensors"), open_checkpoint(sharded)
    assert one.names() == source.names()
    assert all(one.get_raw(name) == source.get_raw(name) for name in source.names())  # exact copies
    args = ("--to", "safetensors", "--max-shard-size", "20KB")
    refused(run_cli("convert", sharded, *args, "-o", tmp_path / "two.safetensors"), "sharded", "-o two")
    refused(run_cli("convert", sharded, "--to", "safetensors", "-o", tmp_path / "m.bin"), "as safetensors")
    ok(run_cli("convert", sharded, *args, "-o", tmp_path / "folder"))
    assert len(open_checkpoint(tmp_path / "folder").files) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "one.safetensors"]


# -- signals -----------------------------------------------------------------------------------------

# Runs the real console entry point, pausing (in the main thread, where signals are handled) once
# the output's temporary exists and the first adapted tensor is being computed, until a line
# arrives on stdin.
PAUSING_MERGE = """
import sys
import loratools.ops.merge.stream as stream
from loratools.cli.main import main

apply_update = stream.apply_update

def pause_once(*args, **kwargs):
    if not getattr(pause_once, "done", False):
        pause_once.done = True
        print("writing", flush=True)
        sys.stdin.readline()
    return apply_update(*args, **kwargs)

stream.apply_update = pause_once
sys.argv = ["loratools", *sys.argv[1:]]
main()
"""


def _paused_merges(fixtures_dir: Path, out: Path, count: int = 1) -> list[subprocess.Popen]:
    """Start ``count`` merges to ``out``; return once each is paused with its temporary written."""
    argv = [sys.executable, "-c", PAUSING_MERGE, "merge", fixtures_dir / "base", fixtures_dir / "adapter"]
    children = [
        subprocess.Popen(
            [*map(str, argv), "-o", str(out), "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
    return children


@pytest.mark.slow  # two subprocesses importing torch (~3 s each, in parallel)
def test_two_merges_racing_on_one_new_output_exactly_one_succeeds(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, second = _paused_merges(fixtures_dir, out, 2)
    assert len(leftovers(tmp_path)) == 2  # both passed the up-front check and are writing
    _, first_err = first.communicate("go\n", timeout=120)
    assert first.returncode == 0, first_err
    published = {p.name: p.read_bytes() for p in out.iterdir()}
    _, second_err = second.communicate("go\n", timeout=120)
    assert second.returncode == 1
    lines = second_err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "created by another run" in lines[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == published  # intact
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.slow  # a subprocess importing torch (~3 s)
def test_sigterm_cleans_up_like_ctrl_c(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (child,) = _paused_merges(fixtures_dir, out)
    assert len(leftovers(tmp_path)) == 1  # the temporary exists, so its removal below is real
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a subprocess importing torch (~3 s)
def test_after_sigkill_the_next_run_removes_the_dead_runs_temporary(
    run_cli, fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (child,) = _paused_merges(fixtures_dir, out)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=120)
    assert len(leftovers(tmp_path)) == 1 and not out.exists()
    ok(run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", out, "-q"))
    assert os.listdir(tmp_path) == ["out"]
