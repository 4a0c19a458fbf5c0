"""Publishing adapters to the Hugging Face Hub and downloading repositories from it.

``push`` validates an adapter folder completely before any network call (it loads, its shapes
match its adapter_config.json, its values are finite), creates the repository if needed, and
uploads the folder in one commit — adding a generated model card (:mod:`loratools.hub.card`) when the
folder has no README.md, without writing into the folder. ``pull`` downloads a repository (or one
revision of it) into a new folder, atomically.

``huggingface_hub`` is imported lazily; it reads ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` itself. Tokens are passed through to it and never printed, logged or stored in
results. Every Hub failure becomes one :class:`HubError` line: what failed, where, how to fix it.

The folder checks live in :mod:`loratools.hub.check` and the error mapping in
:mod:`loratools.hub.failures`; :mod:`loratools.hub` re-exports the public names of all three.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError
from loratools.hub.card import CardFacts, hub_model_id, render_card
from loratools.hub.check import check_adapter_folder
from loratools.hub.failures import HubError, hub_errors
from loratools.io.resolve import HUB_ID
from loratools.progress import Progress, no_progress

__all__ = [
    "HubError",
    "PullOptions",
    "PullResult",
    "PushOptions",
    "PushResult",
    "check_adapter_folder",
    "is_pickle",
    "parse_repo_ref",
    "pull",
    "push",
]

REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
REVISION = re.compile(r"^[\w./-]+$")
# Pickle files are never fetched nor uploaded: loading one can run arbitrary code. Matched in any
# case (``model.BIN`` is a pickle too); ``PICKLES`` spells the same rule as case-blind globs for
# huggingface_hub's ignore_patterns, whose fnmatch is case-sensitive on POSIX.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLES = [
    "*" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in suffix)
    for suffix in PICKLE_SUFFIXES
]


def is_pickle(path: str | Path) -> bool:
    """Whether a file name ends like a pickle (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``,
    ``.ckpt``), in any case."""
    return Path(path).name.lower().endswith(PICKLE_SUFFIXES)


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

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: every field."""
        return asdict(self)


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
        if Path(self.output).suffix.lower() in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            raise LoratoolsError(
                f"-o {self.output}: pull writes a folder (the repository's files), not a "
                f"{Path(self.output).suffix} file; name a folder"
            )


@dataclass(frozen=True)
class PullResult:
    """What was downloaded: every file of ``commit`` into ``output``, less the pickles (``skipped``)."""

    repo_id: str
    revision: str
    commit: str
    output: str
    files: list[str]
    skipped: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: every field."""
        return asdict(self)


# -- what push uploads (no network; the folder itself is checked in loratools.hub.check) ---------


def _upload_files(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Files to upload (path in repo, local path) and the ones skipped (hidden, pickles)."""
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden or is_pickle(path):
            skipped.append(rel)
        else:
            files.append((rel, path))
    return files, skipped


def _is_hub_model(name: str) -> bool:
    """``org/name[@rev]`` that is not also a local path (``models/base`` may be either)."""
    return hub_model_id(name) is not None


def _card_facts(adapter: Adapter, options: PushOptions, repo_id: str) -> tuple[CardFacts, list[str]]:
    """Facts for the card; the adapter's base model is used only if it is a Hub id, not a local path."""
    warnings = []
    base = options.base_model
    recorded = adapter.base_model
    if base is None and recorded:
        if _is_hub_model(recorded):
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


def _kept_card(readme: bytes) -> tuple[bytes, list[str]]:
    """The folder's own README.md, less a front-matter ``base_model`` that is not a Hub id.

    The Hub links ``base_model`` to a model page and refuses a value that names none, such as the
    local path a card written by an older ``loratools extract`` recorded. Everything else is kept
    byte for byte.
    """
    lines = readme.splitlines(keepends=True)
    if not lines or lines[0].strip() != b"---":
        return readme, []
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == b"---"), None)
    for i in range(1, end or 0):
        key, _, value = lines[i].decode("utf-8", "replace").partition(":")
        if key.strip() == "base_model" and value.strip():
            name = value.strip().strip("'\"")
            if not _is_hub_model(name):
                warning = (
                    f"README.md's base_model {name!r} is not a Hub id; the uploaded card leaves it out "
                    "(the folder is not changed)"
                )
                return b"".join(lines[:i] + lines[i + 1 :]), [warning]
    return readme, []


# -- push ---------------------------------------------------------------------------------------


def push(
    folder: str | Path,
    options: PushOptions,
    progress: Progress = no_progress,
    *,
    checked: Adapter | None = None,
) -> PushResult:
    """Validate ``folder`` (no network), then publish it to ``options.repo_id`` in one commit.

    Args:
        folder: a local PEFT adapter folder; it is only read.
        options: repository, visibility, branch, message, token, card facts.
        progress: called after each step ("validated", "repository", "uploaded").
        checked: the adapter :func:`check_adapter_folder` already returned for ``folder``
            (validated again when None).

    Returns:
        The repository URL, the commit and the uploaded file list.

    Raises:
        CheckpointError, ShapeMismatch: the folder is not a valid adapter (before any network call).
        HubError: the Hub refused or could not be reached.
    """
    folder = Path(folder)
    adapter = checked if checked is not None else check_adapter_folder(folder)
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
        card = "kept"
        warnings: list[str] = []
        if (folder / "README.md").is_file():
            readme = (folder / "README.md").read_bytes()
            kept, warnings = _kept_card(readme)
            if kept != readme:
                operations = [op for op in operations if op.path_in_repo != "README.md"]
                operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=kept))
        elif options.card:
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
    weights (``*.bin``, ``*.pt``, … in any case: :func:`is_pickle`) are not downloaded. The
    folder appears only when complete.

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
        skipped = [f for f in remote if is_pickle(f)]
        progress("resolved")
        snapshot_download(
            options.repo_id, revision=info.sha, local_dir=tmp, token=options.token, ignore_patterns=PICKLES
        )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        for path in [p for p in tmp.rglob("*") if p.is_file() and is_pickle(p)]:
            path.unlink()  # a second net, should the pattern matching above ever change
        progress("downloaded")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    revision = options.revision or "main"
    return PullResult(options.repo_id, revision, str(info.sha), str(options.output), files, skipped)
