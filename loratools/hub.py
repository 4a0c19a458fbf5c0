"""Publishing adapters to the Hugging Face Hub and downloading repositories from it.

``push`` validates an adapter folder completely before any network call (it loads, its shapes
match its adapter_config.json, its values are finite), creates the repository if needed, and
uploads the folder in one commit — adding a generated model card (:mod:`loratools.card`) when the
folder has no README.md, without writing into the folder. ``pull`` downloads a repository (or one
revision of it) into a new folder, atomically.

``huggingface_hub`` is imported lazily; it reads ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` itself. Tokens are passed through to it and never printed, logged or stored in
results. Every Hub failure becomes one :class:`HubError` line: what failed, where, how to fix it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.adapter import Adapter
from loratools.card import CardFacts, render_card
from loratools.errors import CheckpointError, LoratoolsError, ShapeMismatch, list_problems
from loratools.formats import peft
from loratools.io.resolve import HUB_ID
from loratools.ops import Progress, no_progress

__all__ = [
    "HubError",
    "PullOptions",
    "PullResult",
    "PushOptions",
    "PushResult",
    "check_adapter_folder",
    "parse_repo_ref",
    "pull",
    "push",
]

REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
REVISION = re.compile(r"^[\w./-]+$")
PICKLES = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]  # never fetched: loading them can run code


class HubError(LoratoolsError):
    """The Hub refused a request or could not be reached."""


def parse_repo_ref(argument: str) -> tuple[str, str | None]:
    """``org/name[@revision]`` → ``(repo_id, revision)``.

    Raises:
        HubError: not of that form.
    """
    match = HUB_ID.match(argument)
    if not match:
        raise HubError(f"{argument}: not a Hub repository id; expected org/name or org/name@revision")
    return match["repo"], match["revision"]


@dataclass(frozen=True)
class PushOptions:
    """How to publish an adapter folder.

    Attributes:
        repo_id: ``org/name`` (or ``name`` for the token's own namespace).
        private: create the repository private (ignored when it exists already).
        revision: the branch to commit to (created from main when missing); None for main.
        message: the commit message.
        token: a Hub token; None uses HF_TOKEN or the ``hf auth login`` token. Never shown.
        license: license id for the card's front matter (only used when a card is generated).
        base_model: the base model's Hub id for the card; defaults to the adapter's
            ``base_model_name_or_path`` when that looks like a Hub id.
        card: generate README.md when the folder has none.
    """

    repo_id: str
    private: bool = False
    revision: str | None = None
    message: str | None = None
    token: str | None = field(default=None, repr=False)
    license: str | None = None
    base_model: str | None = None
    card: bool = True

    def __post_init__(self) -> None:
        if not REPO_NAME.match(self.repo_id) or "--" in self.repo_id or ".." in self.repo_id:
            raise HubError(
                f"{self.repo_id}: not a valid repository id; use org/name (letters, digits, - _ .)"
            )
        if self.revision is not None and not REVISION.match(self.revision):
            raise HubError(f"--revision {self.revision!r}: not a valid branch name")
        if self.base_model is not None and not HUB_ID.match(self.base_model):
            raise HubError(f"--base-model {self.base_model!r}: not a Hub model id (org/name)")
        if self.license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license):
            raise HubError(
                f"--license {self.license!r}: use a Hub license id such as apache-2.0, mit, llama3"
            )


@dataclass(frozen=True)
class PushResult:
    """What was published: ``url`` is the repository page, ``commit_url`` the new commit."""

    repo_id: str
    url: str
    revision: str
    commit: str
    commit_url: str
    files: list[str]
    card: str  # "generated" or "kept"
    skipped: list[str]
    warnings: list[str]


@dataclass(frozen=True)
class PullOptions:
    """What to download: ``repo_id`` at ``revision`` (None: main) into the new folder ``output``."""

    repo_id: str
    output: Path
    revision: str | None = None
    force: bool = False
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parse_repo_ref(self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}")


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    output: str
    files: list[str]
    skipped: list[str]


# -- validation (no network) --------------------------------------------------------------------


def check_adapter_folder(folder: str | Path) -> Adapter:
    """Load a PEFT adapter folder and check that PEFT could load it as its config describes.

    Checks, all collected before raising once: the weights pair up as A (r, in) / B (out, r);
    each module's rank is the one ``r``/``rank_pattern`` give it; ``target_modules`` selects every
    adapted module; ``lora_alpha`` and all tensor values are finite.

    Raises:
        CheckpointError: not a local PEFT folder, or unreadable files.
        ShapeMismatch: shapes that disagree with each other or with the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; push takes a local PEFT adapter folder")
    if not (folder / peft.CONFIG_NAME).is_file() or not (folder / peft.WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{folder}: needs {peft.CONFIG_NAME} and {peft.WEIGHTS_NAME} (a PEFT adapter saved with safetensors)"
        )
    from loratools.io.adapter_dir import load_adapter

    try:
        adapter = load_adapter(folder)
    except ValueError as exc:  # LoraWeight refuses A/B that do not pair up
        raise ShapeMismatch(f"{folder}: {exc}; the adapter is broken, re-save it") from exc
    config = json.loads((folder / peft.CONFIG_NAME).read_text())  # load_adapter parsed it already
    problems = _config_problems(adapter, config) + _value_problems(adapter)
    if problems:
        raise ShapeMismatch(
            f"{folder}: refusing to push a broken adapter: {list_problems(problems)}; "
            "fix adapter_config.json or re-save the adapter"
        )
    return adapter


def _config_problems(adapter: Adapter, config: Mapping[str, Any]) -> list[str]:
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return [f"adapter_config.json: r must be a positive integer, got {r!r}"]
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        return [f"adapter_config.json: lora_alpha must be a finite number, got {alpha!r}"]
    if not adapter.weights:
        return ["no lora_A/lora_B tensors"]
    problems = []
    rank_pattern = config.get("rank_pattern") or {}
    targets = config.get("target_modules")
    for name, weight in adapter.weights.items():
        expected = peft.pattern_value(rank_pattern, name, r)
        if weight.rank != expected:
            problems.append(f"{name} has rank {weight.rank} but the config gives it r={expected}")
        if not _targeted(targets, name):
            problems.append(f"{name} is not selected by target_modules={targets!r} (PEFT would ignore it)")
    return problems


def _targeted(targets: Any, module: str) -> bool:
    """PEFT's rule: a regex string must fullmatch; a list entry must equal the name or end it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if isinstance(targets, list):
        return any(module == t or module.endswith(f".{t}") for t in targets)
    return False


def _value_problems(adapter: Adapter) -> list[str]:
    import torch

    bad = [
        name
        for name, w in adapter.weights.items()
        if not (torch.isfinite(w.a).all() and torch.isfinite(w.b).all())
    ]
    bad += [
        name
        for name, t in adapter.saved_modules.items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    return [f"{name} holds NaN or infinite values" for name in bad]


def _upload_files(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Files to upload (path in repo, local path) and the ones skipped (hidden, pickles)."""
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden or any(path.match(pattern) for pattern in PICKLES):
            skipped.append(rel)
        else:
            files.append((rel, path))
    return files, skipped


def _card_facts(adapter: Adapter, options: PushOptions, repo_id: str) -> tuple[CardFacts, list[str]]:
    """Facts for the card; the adapter's base model is used only if it is a Hub id, not a local path."""
    warnings = []
    base = options.base_model
    recorded = adapter.base_model
    if base is None and recorded:
        if HUB_ID.match(recorded) and not Path(recorded).expanduser().exists():
            base = recorded
        else:
            warnings.append(
                f"the adapter's base model {recorded!r} is a local path, not a Hub id; the card leaves "
                "base_model out (pass --base-model org/name)"
            )
    elif base is None:
        warnings.append(
            "the adapter records no base model; the card leaves base_model out (pass --base-model)"
        )
    return CardFacts(repo_id=repo_id, base_model=base, license=options.license), warnings


# -- push ---------------------------------------------------------------------------------------


def push(folder: str | Path, options: PushOptions, progress: Progress = no_progress) -> PushResult:
    """Validate ``folder`` (no network), then publish it to ``options.repo_id`` in one commit.

    Args:
        folder: a local PEFT adapter folder; it is only read.
        options: repository, visibility, branch, message, token, card facts.
        progress: called after each step ("validated", "repository", "uploaded").

    Returns:
        The repository URL, the commit and the uploaded file list.

    Raises:
        CheckpointError, ShapeMismatch: the folder is not a valid adapter (before any network call).
        HubError: the Hub refused or could not be reached.
    """
    folder = Path(folder)
    adapter = check_adapter_folder(folder)
    files, skipped = _upload_files(folder)
    progress("validated")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=options.token)
    with hub_errors(options.repo_id, "push to", api.endpoint):
        repo_url = api.create_repo(options.repo_id, private=options.private or None, exist_ok=True)
        repo_id = repo_url.repo_id
        if options.revision not in (None, "main"):
            api.create_branch(repo_id, branch=options.revision, exist_ok=True)
        progress("repository")
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        card, warnings = "kept", []
        if options.card and not (folder / "README.md").is_file():
            facts, warnings = _card_facts(adapter, options, repo_id)
            readme = render_card(adapter, facts).encode()
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
            card = "generated"
        message = options.message or f"Upload LoRA adapter ({len(adapter.weights)} modules) with loratools"
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=options.revision)
    progress("uploaded")
    revision = options.revision or "main"
    url = str(repo_url).rstrip("/") + ("" if revision == "main" else f"/tree/{revision}")
    uploaded = sorted(op.path_in_repo for op in operations)
    return PushResult(
        repo_id, url, revision, commit.oid, commit.commit_url, uploaded, card, skipped, warnings
    )


# -- pull ---------------------------------------------------------------------------------------


def pull(options: PullOptions, progress: Progress = no_progress) -> PullResult:
    """Download ``options.repo_id`` at one commit into the new folder ``options.output``.

    The revision is resolved to a commit first, so every file comes from the same commit. Pickled
    weights (``*.bin``, ``*.pt``, …) are not downloaded. The folder appears only when complete.

    Raises:
        OutputExists: ``output`` exists and ``force`` is False.
        HubError: no such repository or revision, refused token, or the Hub unreachable.
    """
    from huggingface_hub import HfApi, snapshot_download

    from loratools.io.writer import atomic_output

    label = options.repo_id + (f"@{options.revision}" if options.revision else "")
    api = HfApi(token=options.token)
    with (
        atomic_output(options.output, force=options.force) as tmp,
        hub_errors(label, "pull from", api.endpoint),
    ):
        info = api.model_info(options.repo_id, revision=options.revision)
        remote = [s.rfilename for s in info.siblings or []]
        skipped = [f for f in remote if any(Path(f).match(p) for p in PICKLES)]
        progress("resolved")
        snapshot_download(
            options.repo_id, revision=info.sha, local_dir=tmp, token=options.token, ignore_patterns=PICKLES
        )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        progress("downloaded")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    revision = options.revision or "main"
    return PullResult(options.repo_id, revision, str(info.sha), str(options.output), files, skipped)


# -- errors -------------------------------------------------------------------------------------


@contextmanager
def hub_errors(label: str, action: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub / transport exceptions into one-line :class:`HubError` messages."""
    from huggingface_hub import errors

    try:
        yield
    except errors.OfflineModeIsEnabled as exc:
        raise HubError(f"{label}: cannot {action} the Hub while HF_HUB_OFFLINE is set; unset it") from exc
    except errors.RepositoryNotFoundError as exc:
        raise HubError(
            f"{label}: no such repository on {endpoint} (or it is private and this token cannot see it); "
            "check the id, or log in with `hf auth login` / set HF_TOKEN"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise HubError(
            f"{label}: the repository has no such revision; check the branch, tag or commit"
        ) from exc
    except errors.HfHubHTTPError as exc:
        raise HubError(_http_message(label, action, exc)) from exc
    except errors.LocalEntryNotFoundError as exc:  # snapshot_download's wrapper for a network failure
        raise HubError(
            f"{label}: could not download from {endpoint}; check the connection and retry"
        ) from exc
    except (OSError, ValueError) as exc:
        raise HubError(f"{label}: {action} failed: {_first_line(exc)}") from exc
    except Exception as exc:
        if not _is_transport_error(exc):
            raise
        raise HubError(
            f"{label}: lost the connection to {endpoint} ({_first_line(exc)}); check the network "
            "or HF_ENDPOINT and retry"
        ) from exc


def _http_message(label: str, action: str, exc: Any) -> str:
    status = exc.response.status_code if exc.response is not None else None
    server = _server_message(exc)
    if status == 401:
        return (
            f"{label}: the Hub rejected the token (401 Unauthorized{server}); set HF_TOKEN or run "
            "`hf auth login` with a token that has write access"
        )
    if status == 403:
        return f"{label}: the token may not {action} this repository (403 Forbidden{server}); use a token with write access to its namespace"
    if status == 409:
        return f"{label}: the Hub reported a conflict (409{server}); another change landed first — retry, or push to another --revision"
    return f"{label}: {action} failed with HTTP {status}{server}"


def _server_message(exc: Any) -> str:
    message = getattr(exc, "server_message", None) or ""
    message = _first_line(message) if message else ""
    return f": {message}" if message else ""


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__


def _is_transport_error(exc: BaseException) -> bool:
    try:
        import httpx2
    except ImportError:  # another huggingface_hub release: fall back to the exception's module
        return type(exc).__module__.split(".")[0] in {"httpx", "httpcore", "requests", "urllib3"}
    return isinstance(exc, httpx2.TransportError)
