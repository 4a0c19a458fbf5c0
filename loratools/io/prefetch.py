"""Overlapping reads with compute: load item i+1 on a background thread while the caller uses item i."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    from loratools.io.checkpoint import Checkpoint
    from loratools.io.safetensors_file import StoredRange

__all__ = ["prefetched", "read_ahead"]

T = TypeVar("T")


def prefetched(
    names: Sequence[str], load: Callable[[str], T], label: str = "read"
) -> Iterator[tuple[str, T]]:
    """Yield ``(name, load(name))`` in order, one item ahead on a single reader thread.

    File reads release the GIL, so reading the next tensor overlaps the math on this one; at most
    two items are alive at once (the one yielded and the one being read).
    """
    if len(names) < 2:
        yield from ((name, load(name)) for name in names)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"loratools-{label}") as pool:
        pending = pool.submit(load, names[0])
        for position, name in enumerate(names):
            item = pending.result()
            if position + 1 < len(names):
                pending = pool.submit(load, names[position + 1])
            yield name, item


def read_ahead(
    ckpt: Checkpoint, order: Sequence[tuple[str, bool]]
) -> Iterator[tuple[str, torch.Tensor | bytes | StoredRange]]:
    """Yield (name, tensor) in ``order`` — or, where its flag is True, where the stored bytes are
    (a :class:`~loratools.io.safetensors_file.StoredRange` the writer copies file to file, or the
    bytes themselves) — reading the next one on a thread meanwhile, into reused buffers (a tensor
    still held, by a writer thread say, is never read into: :class:`~loratools.io.buffers.BufferRing`),
    dropping behind as :meth:`~loratools.io.checkpoint.Checkpoint.pass_reader` says."""
    raw, load = dict(order), ckpt.pass_reader()

    def read(name: str) -> torch.Tensor | bytes | StoredRange:
        return ckpt.stored_range(name) if raw[name] else load(name)

    yield from prefetched([name for name, _ in order], read)
