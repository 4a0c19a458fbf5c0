"""The page cache and passes larger than it: what a streaming pass reads or writes leaves it behind.

A pass over more bytes than the page cache can hold beside everything else gains nothing from
caching them — by the time anything would be read again it is gone — while filling the cache makes
every further read or write reclaim pages first, in the reading process's own time. At 7 B shapes
on a 24 GB machine that reclaim was most of an extract's and a merge's system time. Past
:data:`CACHE_SHARE` of the machine's memory, readers drop each tensor's bytes once read, and
writers start each tensor's writeback at once and drop it when written: a cold 13.5 GB read took
4 s instead of 10–20 s, a 7 B merge 13.7 s instead of 25.7 s. These are ``posix_fadvise`` hints:
no effect on what is read or written, and none where the OS has no such call.
"""

from __future__ import annotations

import contextlib
import os

from loratools.device import physical_memory

__all__ = ["CACHE_SHARE", "WriteBehind", "drop_cached", "exceeds_cache"]

# A pass over more than this share of the machine's memory drops behind: two such inputs (extract's
# pair) or an input and an output (merge) fill half of it
CACHE_SHARE = 0.25


def exceeds_cache(nbytes: int) -> bool:
    """Whether a pass over ``nbytes`` is more than :data:`CACHE_SHARE` of this machine's memory
    (False where the memory size is unknown)."""
    memory = physical_memory()
    return memory > 0 and nbytes > CACHE_SHARE * memory


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop ``length`` bytes of ``fd`` at ``offset`` from the page cache (clean pages at once;
    dirty ones have their writeback started and stay until written)."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # a hint some file systems refuse: no harm without it
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class WriteBehind:
    """A writer's written ranges leave the page cache one range behind.

    Each range is handed to :func:`drop_cached` twice: when written (which starts its writeback:
    the pages are dirty) and when the next range is (by then written back, so dropped). The
    caller flushes its own buffers first.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._previous: tuple[int, int] | None = None

    def written(self, offset: int, length: int) -> None:
        drop_cached(self.fd, offset, length)  # starts the writeback of this range
        if self._previous is not None:
            drop_cached(self.fd, *self._previous)  # written back meanwhile: dropped now
        self._previous = (offset, length)

    def close(self) -> None:
        """Hand the last range over once more (writeback started: the kernel drops it when done)."""
        if self._previous is not None:
            drop_cached(self.fd, *self._previous)
            self._previous = None
