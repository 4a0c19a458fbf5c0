"""What a combine method is: a :class:`Method`, declared in one file of
:mod:`loratools.ops.combine.methods` and listed in its registry.

This module and the method files load without torch (they import it inside their functions):
the CLI reads the registry for ``--method``'s choices, and ``loratools combine --help`` stays
instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratools.adapter import LoraWeight
    from loratools.ops.combine.options import CombineOptions, Pair

__all__ = ["CombineModule", "Method"]

# (module name, the folded pairs (wᵢ·sᵢ·Bᵢ, Aᵢ), options, output dtype) → (module, energy kept)
CombineModule = Callable[[str, "list[Pair]", "CombineOptions", "torch.dtype"], "tuple[LoraWeight, float]"]


@dataclass(frozen=True)
class Method:
    """One way to combine a module's weighted deltas ``wᵢ·sᵢ·Bᵢ·Aᵢ`` into one LoRA module.

    Attributes:
        name: the ``--method`` value.
        help: a few words for ``--help``.
        truncates: the output rank comes from ``-r``/``--energy`` (required); otherwise the
            method keeps every rank and refuses them.
        density: the method takes ``--density`` (required); otherwise it refuses it.
        combine: the function, on float32 pairs on the options' device; returns the module
            (factors in the output dtype, on the CPU) and the fraction of the combined delta's
            energy it keeps.
        check: further option checks of this method: a message, or None when the options fit.
    """

    name: str
    help: str
    truncates: bool
    density: bool
    combine: CombineModule
    check: Callable[[CombineOptions], str | None] | None = None

    def problem(self, options: CombineOptions) -> str | None:
        """The first way ``options`` do not fit this method, as a message; None when they fit."""
        truncating = options.rank is not None or options.energy is not None
        if self.truncates and not truncating:
            return f"--method {self.name} needs -r RANK or --energy F"
        if not self.truncates and truncating:
            return f"the {self.name} method keeps every rank; drop -r/--energy"
        if self.density and options.density is None:
            return f"--method {self.name} needs --density D"
        return self.check(options) if self.check else None
