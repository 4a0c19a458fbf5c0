"""``loratools push ADAPTER_DIR REPO_ID`` and ``loratools pull REPO[@rev] -o DIR``: the Hub commands.

The same two steps as every command: :func:`open_push` validates the folder completely (it loads,
its shapes match its adapter_config.json, its values are finite) before any network call, and
:meth:`OpenPush.run` publishes it in one commit (:func:`loratools.hub.push`), returning the
:class:`~loratools.hub.PushResult` whose ``to_dict()`` is the ``--json`` document. :func:`push`
does both; :func:`pull` downloads (:func:`loratools.hub.pull`, atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.progress import Progress, no_progress

if TYPE_CHECKING:
    from loratools.adapter import Adapter
    from loratools.hub import PullOptions, PullResult, PushOptions, PushResult

__all__ = ["OpenPush", "open_push", "pull", "push"]

STEPS = ("validated", "repository", "uploaded")  # what run's progress reports, in order


@dataclass(frozen=True)
class OpenPush:
    """The folder validated; ``total`` is the number of steps ``run`` reports."""

    folder: Path
    options: PushOptions
    adapter: Adapter
    total: int = len(STEPS)

    def run(self, progress: Progress = no_progress) -> PushResult:
        """Create the repository if needed and upload the folder (with a generated card when it
        has no README.md) in one commit.

        Raises:
            HubError: the Hub refused or could not be reached.
        """
        from loratools.hub import push as publish

        return publish(self.folder, self.options, progress, checked=self.adapter)


def open_push(folder: str | Path, options: PushOptions) -> OpenPush:
    """Validate ``folder`` as a PEFT adapter, without any network call.

    Raises:
        CheckpointError, ShapeMismatch: the folder is not a valid adapter.
    """
    from loratools.hub import check_adapter_folder

    return OpenPush(Path(folder), options, check_adapter_folder(Path(folder)))


def push(folder: str | Path, options: PushOptions, progress: Progress = no_progress) -> PushResult:
    """Open and run in one call (for library use)."""
    return open_push(folder, options).run(progress)


def pull(options: PullOptions, progress: Progress = no_progress) -> PullResult:
    """Download ``options.repo_id`` at one commit into the new folder ``options.output``."""
    from loratools.hub import pull as download

    return download(options, progress)
