"""Whole-model operations on tensor iterators and Adapters: no file paths, no printing.

The progress callback type they take is :class:`loratools.progress.Progress` (core).
"""
