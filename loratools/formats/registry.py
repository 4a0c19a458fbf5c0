"""The adapter formats loratools reads, by family name (as :mod:`loratools.formats.detect`
reports it): each is a module with ``to_adapter(tensors, metadata, *, context)``.

Adding a format: ``formats/NAME.py`` with that function (and ``from_adapter`` for writing), its
entry below, and its (family, algorithm) pairs in ``detect.SUPPORTED``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from loratools.formats import LoadContext, kohya, peft

if TYPE_CHECKING:
    import torch

    from loratools.adapter import Adapter

__all__ = ["FORMATS", "ToAdapter"]


class ToAdapter(Protocol):
    """A format's reader: its tensors and file metadata → Adapter."""

    def __call__(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        *,
        context: LoadContext | None = None,
    ) -> Adapter: ...


FORMATS: dict[str, ToAdapter] = {"peft": peft.to_adapter, "kohya": kohya.to_adapter}
