"""Hub failures as one-line :class:`HubError` messages: what failed, where, how to fix it.

``huggingface_hub`` raises its own exception tree (and lets transport errors of its HTTP client
through); :func:`hub_errors` maps each to a sentence. ``huggingface_hub`` is imported only inside
it, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loratools.errors import LoratoolsError

__all__ = ["HubError", "hub_errors"]


class HubError(LoratoolsError):
    """The Hub refused a request or could not be reached."""


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
