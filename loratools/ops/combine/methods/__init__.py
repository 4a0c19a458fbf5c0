"""The combine methods, one file each; :data:`METHODS` is the registry.

Adding a method: a file ``methods/NAME.py`` defining ``METHOD = Method(...)`` (its name, help,
which options it takes, its function, its own option checks), and its module in the tuple below.
``CombineOptions`` validates against it, ``combine_module`` dispatches through it and the CLI's
``--method`` choices are read from it. (Or, from outside loratools, :func:`register_method`.)
"""

from __future__ import annotations

from loratools.ops.combine.method import Method
from loratools.ops.combine.methods import dare, exact, svd, ties

__all__ = ["METHODS", "Method", "register_method"]

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (exact, svd, ties, dare)}


def register_method(method: Method) -> None:
    """Add (or replace) a combine method; ``CombineOptions`` accepts it from then on."""
    METHODS[method.name] = method
