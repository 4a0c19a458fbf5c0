"""push / pull against a loopback stand-in of the Hub (tests/hub_server.py); no network.

The real huggingface_hub client talks to the stand-in through its endpoint constants (patched
here, as HF_ENDPOINT would set them at import; one subprocess test sets HF_ENDPOINT itself).

What the stand-in does NOT exercise: its preupload answer is always ``uploadMode: "regular"``, so
files travel base64-inline inside the commit NDJSON. The Git-LFS batch upload and the Xet upload
and download paths (what the real Hub uses for ``*.safetensors``) are not tested here, nor are
CDN redirects on download.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.hub_server import HubServer

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running stand-in, with huggingface_hub pointed at it, online, with a private cache and token."""
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN", server.token)
        yield server


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _error_line(result) -> str:
    """The CLI's failure output: exactly one ``error: …`` line on stderr, exit code 1."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match[1])


# -- the round trip ------------------------------------------------------------------------------


def test_push_then_pull_round_trips_byte_identical(hub, run_cli, fixture_copy, tmp_path):
    folder = fixture_copy("adapter")
    before = _tree(folder)

    pushed = run_cli("push", folder, "tester/demo", "--base-model", "org/base", "--license", "apache-2.0")
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == f"{hub.url}/tester/demo"
    assert _tree(folder) == before  # the input is never touched (no README written into it)
    assert len(hub.requests("POST", r"/commit/")) == 1  # one commit
    remote = hub.files("tester/demo")
    assert {k: remote[k] for k in before} == before
    assert set(remote) == {*before, "README.md", ".gitattributes"}

    out = tmp_path / "pulled"
    pulled = run_cli("pull", "tester/demo", "-o", out)
    assert pulled.exit_code == 0, pulled.output
    got = _tree(out)
    assert {k: got[k] for k in before} == before  # byte-identical
    assert got["README.md"] == remote["README.md"]
    assert not (out / ".cache").exists()  # huggingface_hub's bookkeeping is not left behind


def test_pushed_card_parses_and_states_the_adapters_facts(hub, run_cli, fixtures_dir):
    result = run_cli(
        "push", fixtures_dir / "adapter", "tester/demo", "--base-model", "org/base", "--license", "mit"
    )
    assert result.exit_code == 0, result.output
    card = hub.files("tester/demo")["README.md"].decode()
    meta = _front_matter(card)
    assert meta["base_model"] == "org/base"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "mit"
    assert meta["pipeline_tag"] == "text-generation"  # task_type CAUSAL_LM
    assert {"lora", "loratools", "base_model:adapter:org/base"} <= set(meta["tags"])
    assert "| rank r | 4 |" in card and "| alpha | 8 |" in card
    assert "`q_proj`, `v_proj`" in card and "| LoRA parameters | 896 |" in card
    assert 'PeftModel.from_pretrained(base, "tester/demo")' in card
    assert "loratools merge org/base tester/demo -o merged/" in card
    assert len(hub.requests("POST", r"^/api/validate-yaml$")) == 1  # the client validated it too


def test_push_json_reports_url_commit_and_files(hub, run_cli, fixtures_dir):
    result = run_cli("push", fixtures_dir / "adapter", "tester/demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    commit = hub.state.repos["tester/demo"].branches["main"]
    assert report["url"] == f"{hub.url}/tester/demo"
    assert report["commit"] == commit and report["commit_url"].endswith(commit)
    assert report["files"] == ["README.md", *ADAPTER_FILES] and report["card"] == "generated"
    # the fixture's base_model is the local path fixtures/base: not put in the card, and said so
    assert any("local path" in w for w in report["warnings"])
    assert "base_model" not in _front_matter(hub.files("tester/demo")["README.md"].decode())


def test_existing_readme_is_uploaded_as_is(hub, run_cli, fixture_copy):
    folder = fixture_copy("adapter")
    (folder / "README.md").write_text("# my own card\n")
    assert run_cli("push", folder, "tester/demo").exit_code == 0
    assert hub.files("tester/demo")["README.md"] == b"# my own card\n"


def test_kept_readme_loses_a_local_path_base_model_and_nothing_else(hub, run_cli, fixture_copy, tmp_path):
    # the card an older extract wrote: base_model an unquoted local path; the Hub would refuse it
    folder = fixture_copy("adapter")
    local = tmp_path / "models" / "base"
    local.mkdir(parents=True)
    card = f"---\nlibrary_name: peft\nbase_model: {local}\ntags: [lora]\n---\n\n# notes\n"
    (folder / "README.md").write_text(card)
    result = run_cli("push", folder, "tester/demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["card"] == "kept" and any("not a Hub id" in w for w in report["warnings"])
    uploaded = hub.files("tester/demo")["README.md"].decode()
    assert uploaded == card.replace(f"base_model: {local}\n", "")
    assert (folder / "README.md").read_text() == card  # the folder is never changed


def test_kept_readme_keeps_a_hub_id_base_model(hub, run_cli, fixture_copy):
    folder = fixture_copy("adapter")
    card = "---\nbase_model: org/base\n---\n# notes\n"
    (folder / "README.md").write_text(card)
    result = run_cli("push", folder, "tester/demo", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == []
    assert hub.files("tester/demo")["README.md"] == card.encode()


def test_private_is_sent_and_hides_the_repo(hub, run_cli, fixtures_dir, tmp_path, monkeypatch):
    assert run_cli("push", fixtures_dir / "adapter", "tester/secret", "--private").exit_code == 0
    (create,) = hub.requests("POST", r"^/api/repos/create$")
    assert json.loads(create.body)["visibility"] == "private"
    assert hub.state.repos["tester/secret"].private

    monkeypatch.delenv("HF_TOKEN")  # anonymous: the Hub answers as if the repo did not exist
    line = _error_line(run_cli("pull", "tester/secret", "-o", tmp_path / "out"))
    assert "tester/secret" in line and "no such repository" in line
    assert not (tmp_path / "out").exists()


def test_push_to_a_branch_then_pull_that_revision(hub, run_cli, fixtures_dir, tmp_path):
    result = run_cli("push", fixtures_dir / "adapter", "tester/demo", "--revision", "dev", "-m", "first cut")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{hub.url}/tester/demo/tree/dev"
    assert "adapter_model.safetensors" in hub.files("tester/demo", "dev")
    assert "adapter_model.safetensors" not in hub.files("tester/demo", "main")
    assert (
        json.loads(hub.requests("POST", r"/commit/dev$")[0].body.splitlines()[0])["value"]["summary"]
        == "first cut"
    )

    assert run_cli("pull", "tester/demo@dev", "-o", tmp_path / "dev").exit_code == 0
    assert (tmp_path / "dev" / "adapter_model.safetensors").read_bytes() == (
        fixtures_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_bare_name_goes_to_the_tokens_namespace(hub, run_cli, fixtures_dir):
    result = run_cli("push", fixtures_dir / "adapter", "bare-name")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{hub.url}/tester/bare-name"
    assert "adapter_config.json" in hub.files("tester/bare-name")


def test_hub_id_is_accepted_where_an_adapter_is(hub, run_cli, fixtures_dir):
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    result = run_cli("inspect", "tester/demo", "--json")  # io/resolve.py → snapshot_download
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "adapter" and summary["format"] == "peft"
    assert summary["parameters"] == 896


def test_hub_id_is_accepted_where_a_checkpoint_is(hub, run_cli, fixtures_dir):
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    api.create_repo("tester/tiny-base")
    api.upload_folder(repo_id="tester/tiny-base", folder_path=fixtures_dir / "base-sharded")
    result = run_cli("inspect", "tester/tiny-base", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "checkpoint"
    local = json.loads(run_cli("inspect", fixtures_dir / "base-sharded", "--json").stdout)
    assert (summary["tensors"], summary["parameters"]) == (local["tensors"], local["parameters"])


def test_merge_takes_hub_ids_for_base_and_adapter(hub, run_cli, fixtures_dir, tmp_path):
    """End to end: the same merge from Hub ids and from local folders writes identical tensors."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    api.create_repo("tester/tiny-base")
    api.upload_folder(repo_id="tester/tiny-base", folder_path=fixtures_dir / "base")
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    remote = run_cli("merge", "tester/tiny-base", "tester/demo", "-o", tmp_path / "from-hub", "-q")
    assert remote.exit_code == 0, remote.output
    local = run_cli("merge", fixtures_dir / "base", fixtures_dir / "adapter", "-o", tmp_path / "local", "-q")
    assert local.exit_code == 0, local.output
    got, want = (
        load_file(tmp_path / "from-hub" / "model.safetensors"),
        load_file(tmp_path / "local" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pushing_an_unchanged_folder_again_makes_no_empty_commit(hub, run_cli, fixtures_dir):
    first = json.loads(run_cli("push", fixtures_dir / "adapter", "tester/demo", "--json").stdout)
    again = run_cli("push", fixtures_dir / "adapter", "tester/demo", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["commit"] == first["commit"]  # the generated card is deterministic
    assert len(hub.requests("POST", r"/commit/")) == 1


@pytest.mark.slow
def test_hf_endpoint_environment_variable_reaches_the_stand_in(hub, run_cli, fixtures_dir, tmp_path):
    """A fresh process: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import time."""
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": hub.token,
    }
    command = [sys.executable, "-m", "loratools.cli.main", "inspect", "tester/demo", "--json"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "adapter"
    assert hub.requests("GET", r"^/tester/demo/resolve/")  # the files really came from the stand-in


# -- refusing a broken adapter before any network call -------------------------------------------


def _break_rank(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8  # tensors have rank 4: PEFT would fail to load the weights
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _break_targets(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # v_proj weights would be silently ignored by PEFT
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _break_values(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def _break_shapes(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)  # B (out, 3) against A (4, in)
    save_file(tensors, path, metadata={"format": "pt"})


def _break_config(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{not json")


@pytest.mark.parametrize(
    ("breakage", "words"),
    [
        (_break_rank, "config says 8"),  # load-time validation (formats/validate.py) refuses first
        (_break_targets, "would silently skip them"),
        (_break_values, "NaN"),
        (_break_shapes, "lora"),
        (_break_config, "adapter_config.json"),
    ],
)
def test_broken_adapter_is_refused_before_any_request(hub, run_cli, fixture_copy, breakage, words):
    folder = fixture_copy("adapter")
    breakage(folder)
    line = _error_line(run_cli("push", folder, "tester/demo"))
    assert words.lower() in line.lower()
    assert hub.state.requests == []  # nothing was sent


def test_missing_folder_is_not_mistaken_for_a_hub_id(hub, run_cli):
    line = _error_line(run_cli("push", "org/not-a-folder", "tester/demo"))
    assert "not a folder" in line and hub.state.requests == []


# -- Hub failures: one clear line each -----------------------------------------------------------


def test_rejected_token_is_one_line_and_never_printed(hub, run_cli, fixtures_dir, monkeypatch):
    secret = "hf_definitely_not_valid_0123456789"
    result = run_cli("push", fixtures_dir / "adapter", "tester/demo", "--token", secret)
    line = _error_line(result)
    assert "401" in line and "HF_TOKEN" in line
    assert secret not in result.output
    assert hub.requests("POST")[0].headers["authorization"] == f"Bearer {secret}"  # it was used, not shown

    monkeypatch.setenv("HF_TOKEN", secret)
    result = run_cli("push", fixtures_dir / "adapter", "tester/demo", "--json")
    assert "401" in _error_line(result) and secret not in result.output and result.stdout == ""


def test_missing_repository_and_revision(hub, run_cli, fixtures_dir, tmp_path):
    line = _error_line(run_cli("pull", "tester/nothing-here", "-o", tmp_path / "a"))
    assert "tester/nothing-here" in line and "no such repository" in line
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    line = _error_line(run_cli("pull", "tester/demo@no-such-branch", "-o", tmp_path / "b"))
    assert "no such revision" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_conflict_is_one_line(hub, run_cli, fixtures_dir):
    hub.fail("POST", r"/commit/", 409, message="A commit has happened since. Please refresh and try again.")
    line = _error_line(run_cli("push", fixtures_dir / "adapter", "tester/demo"))
    assert "409" in line and "conflict" in line and "A commit has happened since" in line


def test_forbidden_namespace_is_one_line(hub, run_cli, fixtures_dir):
    line = _error_line(run_cli("push", fixtures_dir / "adapter", "someone-else/demo"))
    assert "403" in line and "write access" in line


def test_dropped_connection_during_push_is_one_line(hub, run_cli, fixtures_dir):
    hub.fail("POST", r"^/api/repos/create$", "drop")
    line = _error_line(run_cli("push", fixtures_dir / "adapter", "tester/demo"))
    assert "lost the connection" in line and hub.url in line


def test_dropped_connection_during_pull_is_one_line(hub, run_cli, fixtures_dir, tmp_path):
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    hub.fail("GET", r"^/api/models/", "drop")
    line = _error_line(run_cli("pull", "tester/demo", "-o", tmp_path / "out"))
    assert "lost the connection" in line
    assert not (tmp_path / "out").exists()


def test_failed_download_leaves_no_partial_output(hub, run_cli, fixtures_dir, tmp_path):
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    hub.fail("GET", r"/resolve/.*adapter_model\.safetensors$", 403, message="Access denied")
    line = _error_line(run_cli("pull", "tester/demo", "-o", tmp_path / "out"))
    assert "403" in line
    assert list(tmp_path.glob("*out*")) == []  # neither the output nor a temporary folder


def test_existing_output_needs_force(hub, run_cli, fixtures_dir, tmp_path):
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo").exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in _error_line(run_cli("pull", "tester/demo", "-o", out))
    assert (out / "keep.txt").read_text() == "mine" and hub.requests("GET", r"/resolve/") == []
    assert run_cli("pull", "tester/demo", "-o", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()


def test_offline_mode_is_named(hub, run_cli, fixtures_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = _error_line(run_cli("push", fixtures_dir / "adapter", "tester/demo"))
    assert "HF_HUB_OFFLINE" in line and hub.state.requests == []


def test_bad_repo_ids_are_usage_errors_without_requests(hub, run_cli, fixtures_dir, tmp_path):
    assert "not a valid repository id" in _error_line(run_cli("push", fixtures_dir / "adapter", "a/b/c"))
    assert "not a Hub repository id" in _error_line(run_cli("pull", "just-a-name", "-o", tmp_path / "x"))
    assert hub.state.requests == []


def test_pull_json_and_no_card(hub, run_cli, fixtures_dir, tmp_path):
    assert run_cli("push", fixtures_dir / "adapter", "tester/demo", "--no-card").exit_code == 0
    assert "README.md" not in hub.files("tester/demo")
    result = run_cli("pull", "tester/demo", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["commit"] == hub.state.repos["tester/demo"].branches["main"]
    assert report["files"] == [".gitattributes", *ADAPTER_FILES] and report["skipped"] == []


def test_hidden_files_and_pickles_are_not_uploaded(hub, run_cli, fixture_copy):
    folder = fixture_copy("adapter")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]\n")
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (folder / "notes").mkdir()
    (folder / "notes" / "eval.json").write_text("{}")
    result = run_cli("push", folder, "tester/demo", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == [".git/config", "training_args.bin"]
    assert set(hub.files("tester/demo")) == {".gitattributes", "README.md", "notes/eval.json", *ADAPTER_FILES}


PICKLE_NAMES = [
    "model.BIN",
    "weights.Pt",
    "x.PTH",
    "opt.CKPT",
    "state.Pkl",
    "a/b/optimizer.bin",
    "data.pickle",
]


def test_pickles_are_recognised_in_any_case():
    from loratools.hub import PICKLES, is_pickle

    assert all(is_pickle(name) for name in PICKLE_NAMES)
    assert not any(is_pickle(n) for n in ("model.safetensors", "bin", "x.binary", "x.pt.json", "x.ptx"))
    from huggingface_hub.utils import filter_repo_objects  # what snapshot_download filters with

    names = [*PICKLE_NAMES, "model.safetensors", "x.binary"]
    assert list(filter_repo_objects(names, ignore_patterns=PICKLES)) == ["model.safetensors", "x.binary"]


def test_pull_skips_pickles_whatever_their_case(hub, run_cli, fixtures_dir, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    api.create_repo("tester/mixed")
    api.upload_folder(repo_id="tester/mixed", folder_path=fixtures_dir / "adapter")
    for name in PICKLE_NAMES:
        api.upload_file(path_or_fileobj=b"\x80\x04pickle", path_in_repo=name, repo_id="tester/mixed")
    result = run_cli("pull", "tester/mixed", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["skipped"]) == sorted(PICKLE_NAMES)
    assert sorted(_tree(tmp_path / "out")) == sorted(report["files"]) == [".gitattributes", *ADAPTER_FILES]


def test_push_skips_pickles_whatever_their_case(hub, run_cli, fixture_copy):
    folder = fixture_copy("adapter")
    (folder / "training_args.BIN").write_bytes(b"\x80\x04pickle")
    (folder / "optimizer.Pt").write_bytes(b"\x80\x04pickle")
    result = run_cli("push", folder, "tester/demo", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == ["optimizer.Pt", "training_args.BIN"]
    assert set(hub.files("tester/demo")) == {".gitattributes", "README.md", *ADAPTER_FILES}


def test_a_sentence_transformers_base_from_the_hub_merges_whole(hub, run_cli, fixtures_dir, tmp_path):
    from huggingface_hub import HfApi

    from tests.io.test_writer import sentence_transformers_folder

    model = sentence_transformers_folder(tmp_path)
    shutil.copyfile(fixtures_dir / "base" / "model.safetensors", model / "model.safetensors")
    for name in ("pytorch_model.bin", "model.safetensors.index.json", ".gitattributes"):
        (model / name).unlink()
    shutil.rmtree(model / ".git")
    shutil.rmtree(model / ".cache")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    (model / "modeling_custom.py").write_text("# remote code: copied, never run\n")
    api = HfApi(token=hub.token)
    api.create_repo("tester/st-base")
    api.upload_folder(repo_id="tester/st-base", folder_path=model)
    result = run_cli("merge", "tester/st-base", fixtures_dir / "adapter", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    for name in ("1_Pooling/config.json", "2_Dense/model.safetensors", "modules.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (model / name).read_bytes()
    assert (tmp_path / "out" / "modeling_custom.py").is_file()


def test_gguf_repo_downloads_only_the_named_file(hub, run_cli, fixtures_dir, tmp_path):
    """A GGUF repository holds one file per quantization: a bare repo id must not pull them all.

    The bare id is refused naming the files; ``org/name/FILE.gguf`` downloads that file alone."""
    from huggingface_hub import HfApi

    from tests.io.test_gguf_io import write_gguf_model

    api = HfApi(token=hub.token)
    api.create_repo("tester/tiny-gguf")
    for qtype in ("F32", "Q8_0"):
        write_gguf_model(fixtures_dir / "base", tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
        api.upload_file(
            path_or_fileobj=tmp_path / f"tiny-{qtype}.gguf",
            path_in_repo=f"tiny-{qtype}.gguf",
            repo_id="tester/tiny-gguf",
        )
    refused = run_cli("inspect", "tester/tiny-gguf")
    assert refused.exit_code == 1, refused.output
    # huggingface_hub draws its own "Fetching 0 files" bar first; loratools' part is one error line
    ours = [line for line in refused.stderr.splitlines() if line.strip() and "Fetching" not in line]
    assert len(ours) == 1 and "GGUF files only (2)" in ours[0], refused.stderr
    assert "tester/tiny-gguf/tiny-Q8_0.gguf" in ours[0]

    result = run_cli("inspect", "tester/tiny-gguf/tiny-Q8_0.gguf", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kind"] == "checkpoint"
    downloaded = [r.path for r in hub.requests("GET", r"\.gguf$")]
    assert downloaded and all(path.endswith("/tiny-Q8_0.gguf") for path in downloaded)
    assert "no such file" in _error_line(run_cli("inspect", "tester/tiny-gguf/tiny-Q4_0.gguf"))
