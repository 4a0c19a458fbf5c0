"""The exceptions loratools raises on bad input.

Every message is one line that says what went wrong, where, and how to fix it. The CLI turns a
:class:`LoratoolsError` into ``error: <message>`` on stderr and exit code 1.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "InvalidAdapter",
    "InvalidOptions",
    "LoratoolsError",
    "MissingExtra",
    "MissingKeys",
    "NonFiniteResult",
    "OutputExists",
    "ShapeMismatch",
    "UnknownFormat",
]


class LoratoolsError(Exception):
    """Base class: a problem with the user's input, files or environment (exit code 1)."""


class UnknownFormat(LoratoolsError):
    """A file or directory whose format cannot be determined (or is ambiguous)."""


class CheckpointError(LoratoolsError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or unsafe."""


class ShapeMismatch(LoratoolsError):
    """Tensors whose shapes do not fit together (adapter vs base, base vs fine-tune)."""


class MissingKeys(LoratoolsError):
    """Names that should exist but do not (unresolved modules, missing shards)."""


class InvalidAdapter(LoratoolsError):
    """An adapter whose config or tensors contradict each other or hold unusable values
    (alpha not a finite number, NaN/Inf factors, ranks that disagree with ``r``/``rank_pattern``)."""


class InvalidOptions(LoratoolsError):
    """An option value out of range or in conflict with another option (a bad flag value)."""


class NonFiniteResult(LoratoolsError):
    """A computation that would write NaN/Inf values (an overflow, or factors too large)."""


class OutputExists(LoratoolsError):
    """An output path that already exists and was not allowed to be replaced."""


class MissingExtra(LoratoolsError):
    """An optional dependency that the requested feature needs is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package, which is not installed; "
            f"install it with: pip install 'loratools[{extra}]'"
        )


def name_summary(names: list[str], limit: int = 3, noun: str = "tensor") -> str:
    """``12 tensors (model.layers.…: 0.mlp.up_proj.weight, 0.self_attn.q_proj.weight, …)``: a count,
    the dotted prefix every name shares said once, and the first ``limit`` names without it."""
    if not names:
        return f"no {noun}s"
    parts = [name.split(".")[:-1] for name in names] if len(names) > 1 else [[]]
    common = next(
        (i for i, ps in enumerate(zip(*parts, strict=False)) if len(set(ps)) > 1), min(map(len, parts))
    )
    prefix = "".join(f"{part}." for part in parts[0][:common])
    shown = ", ".join(name[len(prefix) :] for name in names[:limit]) + (", …" if len(names) > limit else "")
    plural = noun if len(names) == 1 else f"{noun}s"
    return f"{len(names)} {plural} ({prefix}…: {shown})" if prefix else f"{len(names)} {plural} ({shown})"


def list_problems(problems: list[str], limit: int = 8) -> str:
    """Join a list of problems into one line, eliding the tail past ``limit`` items."""
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return f"{shown}; … and {more} more" if more > 0 else shown
