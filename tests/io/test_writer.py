"""Atomic outputs: complete or absent, never partial; inputs never overwritten."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loratools.errors import LoratoolsError, OutputExists
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import (
    CheckpointWriter,
    atomic_output,
    check_not_an_input,
    checkpoint_output_is_file,
    copy_model_files,
    model_files,
    plan_shards,
    remove_stale_temporaries,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "loratools" in p.name)


def test_success_renames_into_place(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert leftovers(tmp_path) == []


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "half.safetensors").write_bytes(b"123")
        raise ValueError("boom")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_existing_output_refused_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputExists, match="--force"), atomic_output(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "old.txt").exists()
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out", force=True) as tmp:
        tmp.mkdir()
        raise RuntimeError("failed halfway")
    assert (tmp_path / "out" / "old.txt").read_text() == "old"  # a failed forced run keeps the old output
    with atomic_output(tmp_path / "out", force=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_writer_failure_inside_atomic_output_leaves_nothing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]
    with (
        pytest.raises(RuntimeError),
        atomic_output(tmp_path / "ckpt") as tmp,
        CheckpointWriter(tmp, plan_shards(specs, 16)) as writer,
    ):
        writer.write("a", torch.zeros(4))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_plan_shards_respects_the_size_and_names_like_hugging_face() -> None:
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    layout = plan_shards(specs, 100)
    assert [s.filename for s in layout] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [len(s.specs) for s in layout] == [2, 2, 1]
    assert all(sum(spec.nbytes for spec in s.specs) <= 100 for s in layout)
    assert [s.filename for s in plan_shards(specs, None)] == ["model.safetensors"]


def test_outputs_overlapping_inputs_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for output in (model, model / "sub", tmp_path):
        with pytest.raises(LoratoolsError, match="overlaps the input"):
            check_not_an_input(output, [model])
    check_not_an_input(tmp_path / "elsewhere", [model, None])


def test_copy_model_files_skips_weights(fixtures_dir: Path, tmp_path: Path) -> None:
    copied = copy_model_files(fixtures_dir / "base-sharded", tmp_path)
    assert copied == ["config.json", "generation_config.json"]


# -- names, races and leftovers (issue 12 §3) ------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited (it could only be reused after wrapping around)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(child.stdout)


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_255_character_output_name_works(tmp_path: Path, as_folder: bool) -> None:
    output = tmp_path / ("n" * 243 + ".safetensors")  # 255 characters: the longest valid name
    assert len(output.name) == 255
    with atomic_output(output) as tmp:
        assert len(tmp.name) < 100  # short whatever the output name
        if as_folder:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"weights")
        else:
            tmp.write_bytes(b"weights")
    assert (output / "model.safetensors" if as_folder else output).read_bytes() == b"weights"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("as_folder", [False, True])
def test_two_runs_racing_on_one_output_exactly_one_wins(tmp_path: Path, as_folder: bool) -> None:
    """Both runs pass the up-front check and write their temporaries; only one may publish."""
    output = tmp_path / ("out" if as_folder else "out.safetensors")
    both_written = threading.Barrier(2)
    results: dict[str, str] = {}

    def run(label: str) -> None:
        try:
            with atomic_output(output) as tmp:
                if as_folder:
                    tmp.mkdir()
                    (tmp / "who").write_text(label)
                else:
                    tmp.write_text(label)
                both_written.wait(timeout=30)
            results[label] = "published"
        except OutputExists as exc:
            results[label] = str(exc)

    threads = [threading.Thread(target=run, args=(label,)) for label in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [label for label, result in results.items() if result == "published"]
    assert len(winners) == 1, results
    loser = ({"first", "second"} - set(winners)).pop()
    assert "created by another run" in results[loser] and "--force" in results[loser]
    assert (output / "who" if as_folder else output).read_text() == winners[0]  # intact, not replaced
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("competitor", ["file", "empty folder", "folder"])
def test_an_output_that_appears_meanwhile_is_refused_at_publish_time(tmp_path: Path, competitor: str) -> None:
    for as_folder in (False, True):
        output = tmp_path / f"out-{as_folder}"
        with pytest.raises(OutputExists, match="created by another run"), atomic_output(output) as tmp:
            if as_folder:
                tmp.mkdir()
                (tmp / "mine").write_text("mine")
            else:
                tmp.write_text("mine")
            if competitor == "file":
                output.write_text("theirs")
            else:
                output.mkdir()
                if competitor == "folder":
                    (output / "theirs").write_text("theirs")
        if competitor == "file":
            assert output.read_text() == "theirs"
        else:
            assert sorted(p.name for p in output.iterdir()) == (
                [] if competitor == "empty folder" else ["theirs"]
            )
        assert leftovers(tmp_path) == []


def test_forced_replacement_still_replaces_at_publish_time(tmp_path: Path) -> None:
    output = tmp_path / "out.safetensors"
    with atomic_output(output, force=True) as tmp:
        tmp.write_text("new")
        output.write_text("theirs")  # appeared meanwhile: --force replaces it
    assert output.read_text() == "new"
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed_and_only_those(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with atomic_output(output) as tmp:  # learn this output's temporary pattern from a real one
        name = tmp.name
        tmp.mkdir()
    prefix, _pid, rand = name.rsplit(".loratools.tmp", 1)[0].rsplit("-", 2)

    def temporary(pid: int, kind: str = "tmp", of: str = prefix) -> Path:
        path = tmp_path / f"{of}-{pid}-{rand}.loratools.{kind}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 64)
        return path

    dead = _dead_pid()
    stale = [temporary(dead), temporary(dead, "old")]
    alive = temporary(os.getppid())  # the process that started pytest: running
    other_output = temporary(dead, of=prefix.replace(".out.", ".out2."))
    (tmp_path / "unrelated.tmp").write_text("keep")
    with atomic_output(output, force=True) as tmp:  # a later run on the same output
        tmp.write_text("new")
    assert not any(path.exists() for path in stale)
    assert alive.exists() and other_output.exists() and (tmp_path / "unrelated.tmp").exists()
    assert output.read_text() == "new"


def test_an_old_output_left_aside_by_a_killed_forced_run_is_put_back(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with atomic_output(output) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_output(output, force=True) as tmp:
        name = tmp.name  # this output's temporary pattern; nothing is published
        raise RuntimeError
    # the killed run had moved the old output aside and died before publishing its own
    aside = tmp_path / name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-").replace(".tmp", ".old")
    os.replace(output, aside)
    assert remove_stale_temporaries(output) == []
    assert (output / "weights").read_text() == "old" and not aside.exists()


@pytest.mark.slow
def test_a_killed_writer_leaves_a_temporary_that_the_next_run_removes(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the temporary stays, and the next run on that output removes it."""
    output = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from loratools.io.writer import atomic_output\n"
        "with atomic_output(sys.argv[1]) as tmp:\n"
        "    tmp.mkdir()\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 4096)\n"
        "    print(tmp.name, flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(output)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    name = child.stdout.readline().strip()  # the temporary exists once its name is printed
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (tmp_path / name).is_dir() and leftovers(tmp_path) == [name]
    with atomic_output(output) as tmp:
        tmp.mkdir()
    assert leftovers(tmp_path) == [] and output.is_dir()


# -- what a model folder carries (issue 12 §5) -----------------------------------------------------


# what a merge carries of sentence_transformers_folder(): every non-weight file and sub-folder
SENTENCE_TRANSFORMERS_CARRIED = [
    "1_Pooling/config.json",
    "2_Dense/config.json",
    "2_Dense/model.safetensors",
    "README.md",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
]


def sentence_transformers_folder(root: Path) -> Path:
    """The shape of a sentence-transformers model: weights at the top, modules in sub-folders."""
    model = root / "st-model"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "2_Dense").mkdir()
    (model / ".git" / "objects").mkdir(parents=True)
    (model / ".cache").mkdir()
    files = {
        "config.json": b'{"model_type": "bert"}',
        "modules.json": b'[{"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"}]',
        "sentence_bert_config.json": b'{"max_seq_length": 128}',
        "tokenizer.json": b"{}",
        "README.md": b"# model",
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "2_Dense/config.json": b'{"in_features": 8}',
        "2_Dense/model.safetensors": b"dense weights nothing rewrites",
    }
    for name, data in files.items():
        (model / name).write_bytes(data)
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", ".gitattributes"):
        (model / name).write_bytes(b"not copied")
    (model / ".git" / "objects" / "x").write_bytes(b"not copied")
    return model


def test_copy_model_files_copies_every_file_and_folder_but_the_weights(tmp_path: Path) -> None:
    model = sentence_transformers_folder(tmp_path)
    os.mkfifo(model / "a-fifo")  # would block a copy: skipped
    (tmp_path / "elsewhere").mkdir()
    (model / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_model_files(model, out)
    assert sorted(copied) == SENTENCE_TRANSFORMERS_CARRIED
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == SENTENCE_TRANSFORMERS_CARRIED
    for name in SENTENCE_TRANSFORMERS_CARRIED:
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert model_files(model) == [
        "1_Pooling/",
        "2_Dense/",
        "README.md",
        "config.json",
        "modules.json",
        "sentence_bert_config.json",
        "tokenizer.json",
    ]


def test_without_hard_links_a_file_is_still_claimed_after_a_recheck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*_: object, **__: object) -> None:
        raise PermissionError(errno.EPERM, "hard links not supported")  # as on some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    output = tmp_path / "out.safetensors"
    with atomic_output(output) as tmp:
        tmp.write_text("mine")
    assert output.read_text() == "mine"
    with pytest.raises(OutputExists, match="another run"), atomic_output(tmp_path / "b.safetensors") as tmp:
        tmp.write_text("mine")
        (tmp_path / "b.safetensors").write_text("theirs")
    assert (tmp_path / "b.safetensors").read_text() == "theirs"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "shards", "expected"),
    [
        ("m.safetensors", None, True),
        ("m", None, False),
        ("m.v2", None, False),
        ("m", 3, False),
        ("m.safetensors", 3, "sharded (3 file(s) and an index)"),
        ("m.safetensors", 1, "sharded (1 file(s) and an index)"),
        ("m.bin", None, "name the output m.safetensors (one file) or m (a model folder)"),
        ("m.PT", None, "writes checkpoints as safetensors"),
        ("m.SafeTensors", None, "writes checkpoints as safetensors"),
        ("m.gguf", None, "writes checkpoints as safetensors"),
    ],
)
def test_an_output_is_what_its_name_says(name: str, shards: int | None, expected: bool | str) -> None:
    if isinstance(expected, bool):
        assert checkpoint_output_is_file(Path("/x") / name, source="base", shards=shards) is expected
        return
    with pytest.raises(LoratoolsError) as caught:
        checkpoint_output_is_file(Path("/x") / name, source="base", shards=shards)
    assert expected in str(caught.value) and f"-o /x/{name}" in str(caught.value)


def test_temporaries_in_the_earlier_naming_are_pointed_out_not_removed(tmp_path: Path) -> None:
    earlier = tmp_path / ".out.loratools-0123abcd.tmp"  # no pid: its run may still be going on
    earlier.mkdir()
    warning = r"\.out\.loratools-0123abcd\.tmp; delete them if no"
    with pytest.warns(UserWarning, match=warning), atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert earlier.is_dir() and (tmp_path / "out").is_dir()
