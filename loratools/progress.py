"""The progress callback every long operation takes: core, so no layer imports ops for a type."""

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called once per unit of work (module or tensor) with its name; the CLI draws a bar from it."""


def no_progress(_: str) -> None:
    """The default progress callback: do nothing."""
