"""Recycled CPU byte buffers for streaming passes: no fresh pages to fault in for every tensor.

Used by the readers of this package and, through the allocator the merge stream hands to its
``Scratch``, by the merge's output casts.
"""

from __future__ import annotations

import torch

__all__ = ["BufferRing"]

# torch's count of the owners of a storage (tensors, views, storage objects); private, so looked up
# defensively: without it every read gets fresh memory, as before the ring existed
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


class BufferRing:
    """A few byte buffers that tensor reads (and merge outputs) reuse once nobody holds them any more.

    A read that gets fresh memory page-faults every page of it in (the kernel zeroes each 4 KiB
    page first), which costs more system time than the copy itself; a buffer read into before
    has its pages already. A buffer is handed out again only when no tensor, view or array
    made from it is alive (torch's storage use count is exactly ours), so a caller that keeps a
    tensor — or hands it to a writer thread — keeps it safe: the ring just allocates anew.

    ``slots`` bounds how many buffers stay alive: a prefetching loop holds the item the caller
    is working on, the one read ahead, and briefly the one before (the caller's loop variable
    still refers to it while the next one is requested), hence 3. A buffer more than
    ``4 × max(request, 16 MiB)`` is replaced rather than reused, so one huge tensor (an embedding)
    does not pin its memory for the rest of the pass (the next large request replaces it); a
    request of at most 16 MiB replaces only a buffer of at most 16 MiB. Only one thread may call
    :meth:`take`.
    """

    SHRINK = 4
    SMALL = 16 << 20

    def __init__(self, slots: int = 3) -> None:
        self._slots: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self.reused = 0  # how many takes found a free buffer big enough (for tests and profiling)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` that no one else holds: a reused buffer's prefix, or new."""
        if _USE_COUNT is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        free = [i for i, buf in enumerate(self._slots) if _USE_COUNT(buf.untyped_storage()._cdata) <= 2]
        # 2 = the slot's own tensor + the temporary storage object made to ask
        fits = [i for i in free if nbytes <= self._slots[i].numel() <= self.SHRINK * max(nbytes, self.SMALL)]
        if fits:
            self.reused += 1
            return self._slots[min(fits, key=lambda i: self._slots[i].numel())][:nbytes]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        # replace the smallest free buffer (freeing it) by this one — but a small read (a norm
        # between two layers' matrices) never evicts a big buffer: it costs little fresh, while the
        # next matrix would have to fault a whole new buffer in (at 7 B shapes that was 14 of 24
        # MLP reads and 2.3 M page faults in an extract)
        evictable = [i for i in free if nbytes > self.SMALL or self._slots[i].numel() <= self.SMALL]
        if evictable:
            self._slots[min(evictable, key=lambda i: self._slots[i].numel())] = buffer
        return buffer[:nbytes]  # a view, as for a reused buffer: the slot's own tensor stays private
