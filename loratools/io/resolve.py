"""Turning a command-line argument into a local path: a file, a folder, or a Hub id.

Two Hub forms, both downloaded with ``huggingface_hub`` (which honours the local cache,
``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``):

- ``org/name[@rev]``: the repository's snapshot — safetensors, JSON, tokenizer, template and
  code files only, never pickles, and never GGUF files: a GGUF repository usually holds one file
  per quantization (tens of GB together), so a repository without safetensors is refused with
  the names of its GGUF files;
- ``org/name/path/file.gguf[@rev]`` (or ``….safetensors``): that one file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loratools.errors import CheckpointError

__all__ = ["HUB_FILE", "HUB_ID", "resolve_path"]

_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
HUB_ID = re.compile(rf"^{_REPO}(?:@(?P<revision>[\w./-]+))?$")
HUB_FILE = re.compile(rf"^{_REPO}/(?P<file>[\w./-]+\.(?:gguf|safetensors))(?:@(?P<revision>[\w./-]+))?$")
# What a model's folder needs besides its weights, in sub-folders too (a sentence-transformers
# 1_Pooling/config.json): configs, tokenizers (sentencepiece, tiktoken), chat templates, and the
# modelling code of trust_remote_code models (downloaded to be copied along, never run). No pickles.
HUB_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.txt",
    "*.md",
    "*.jinja",
    "*.tiktoken",
    "*.py",
]


def resolve_path(argument: str | Path, *, what: str = "checkpoint") -> Path:
    """The local path for ``argument``, downloading a Hub id's snapshot if needed.

    Args:
        argument: a local path or a Hub id ``org/name[@revision]``.
        what: a word for error messages ("checkpoint", "adapter").

    Raises:
        CheckpointError: not a local path, and not obtainable from the Hub (with the reason).
    """
    path = Path(argument).expanduser()
    if path.exists():
        return path
    if match := HUB_FILE.match(str(argument)):
        return _download_file(match["repo"], match["file"], match["revision"], what)
    if match := HUB_ID.match(str(argument)):
        return _download(match["repo"], match["revision"], what)
    raise CheckpointError(f"{argument}: no such file or directory")


def _download(repo_id: str, revision: str | None, what: str) -> Path:
    import huggingface_hub

    label = f"{repo_id}@{revision}" if revision else repo_id
    with _hub_errors(label, revision, what):
        folder = Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
        )
    if not any(folder.rglob("*.safetensors")):
        with _hub_errors(label, revision, what):
            ggufs = [
                f
                for f in huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision)
                if f.endswith(".gguf")
            ]
        if ggufs:
            shown = ", ".join(f"{repo_id}/{name}" for name in ggufs[:4]) + (", …" if len(ggufs) > 4 else "")
            raise CheckpointError(
                f"{label}: holds GGUF files only ({len(ggufs)}); name the one to use, e.g. {shown}"
            )
    return folder


def _download_file(repo_id: str, filename: str, revision: str | None, what: str) -> Path:
    import huggingface_hub

    label = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    with _hub_errors(label, revision, what):
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))


@contextmanager
def _hub_errors(label: str, revision: str | None, what: str) -> Iterator[None]:
    """Hub failures as one CheckpointError line saying what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{label}: not a local path, and not in the Hub cache while offline "
            "(HF_HUB_OFFLINE is set or the Hub is unreachable); download it first or pass a local path"
        ) from exc
    except errors.EntryNotFoundError as exc:  # after Local…, its subclass
        raise CheckpointError(f"{label}: the Hub repository has no such file") from exc
    except errors.RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{label}: not a local path, and no such {what} on the Hub (or it is private: log in "
            "with `hf auth login` or set HF_TOKEN)"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise CheckpointError(f"{label}: the Hub repository has no revision {revision!r}") from exc
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{label}: could not fetch it from the Hub ({reason})") from exc
