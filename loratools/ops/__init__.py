"""Whole-model operations on tensor iterators and Adapters: no file paths, no printing."""

# Progress lives in loratools.progress (core). Re-exported for now only for ops/extract/stream.py,
# ops/merge/stream.py and ops/merge/api.py, whose import lines move once their current edits land.
from loratools.progress import Progress, no_progress

__all__ = ["Progress", "no_progress"]
