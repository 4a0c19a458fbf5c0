"""Turning a command-line argument into a local path: a file, a folder, or a Hub id ``org/name[@rev]``.

Hub ids are downloaded (safetensors, JSON, tokenizer, template and code files only — never
pickles) with ``huggingface_hub.snapshot_download``, which honours the local cache,
``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import re
from pathlib import Path

from loratools.errors import CheckpointError

__all__ = ["HUB_ID", "resolve_path"]

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# What a model's folder needs besides its weights, in sub-folders too (a sentence-transformers
# 1_Pooling/config.json): configs, tokenizers (sentencepiece, tiktoken), chat templates, and the
# modelling code of trust_remote_code models (downloaded to be copied along, never run). No pickles.
HUB_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.txt",
    "*.md",
    "*.gguf",
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
    match = HUB_ID.match(str(argument))
    if not match:
        raise CheckpointError(f"{argument}: no such file or directory")
    return _download(match["repo"], match["revision"], what)


def _download(repo_id: str, revision: str | None, what: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except errors.LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{label}: not a local path, and not in the Hub cache while offline "
            "(HF_HUB_OFFLINE is set or the Hub is unreachable); download it first or pass a local path"
        ) from exc
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
    return Path(folder)
