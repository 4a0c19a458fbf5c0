"""Whole-model operations on tensor iterators and Adapters: no file paths, no printing."""

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called once per unit of work (module or tensor) with its name; the CLI draws a bar from it."""


def no_progress(_: str) -> None:
    """The default progress callback: do nothing."""
