"""Flags shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

json_flag = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
quiet_flag = click.option("-q", "--quiet", is_flag=True, help="No progress bar or tables on stderr.")
force_flag = click.option("--force", is_flag=True, help="Replace OUT if it already exists.")
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the math runs: auto (cuda when available), cpu, cuda, cuda:N.",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Output dtype (default: keep the input's).",
)

split_option = click.option(
    "--split",
    type=click.Choice(["sqrt", "b"]),
    default="sqrt",
    show_default=True,
    help="Where the singular values go: sqrt (B = U√S, A = √S·Vᵀ) or b (B = U·S, A = Vᵀ).",
)


def reporting(command: F) -> F:
    """``--json`` and ``--quiet``."""
    return json_flag(quiet_flag(command))
