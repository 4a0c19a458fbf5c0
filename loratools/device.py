"""Choosing where the math runs, and on how many CPU threads."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from loratools.errors import LoratoolsError

if TYPE_CHECKING:
    import torch

__all__ = ["cpu_math_threads", "keep_thread_count", "leaves_cores_for_io", "math_threads", "resolve_device"]

# torch is imported where it is used: the CLI calls keep_thread_count before any command loads
# (``loratools --help`` never imports torch)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda``/``cuda:N`` are checked to exist.

    Raises:
        LoratoolsError: a CUDA device was asked for but is not available.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LoratoolsError(
            f"--device {name!r} is not a device name (use auto, cpu, cuda or cuda:N)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoratoolsError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LoratoolsError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 … cuda:N-1, or --device cpu"
        )
    return device


P = ParamSpec("P")
R = TypeVar("R")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def physical_memory() -> int:
    """This machine's memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


ALL_CORES_UP_TO = 2  # machines this small keep one math thread per core (see math_threads)


def math_threads(io_threads: int, cores: int | None = None) -> int:
    """torch's intra-op (OpenMP) threads for a streaming pass: the cores less ``io_threads`` that
    its own reader/writer threads keep busy, at least 1.

    Why not all cores: OpenMP threads wait for each other at the end of every parallel region
    (a matmul, a QR), so one thread that loses its core — to our reader, or to another process
    — stalls them all (numbers: docs/benchmarks.md, "OpenMP threads").

    Only torch's default (one thread per core) is lowered, and only with more than
    :data:`ALL_CORES_UP_TO` cores: on 2 cores the lost core costs more than the stalls do on an
    idle machine (extract at 0.66 B: 4.2 s on both cores vs 5.7 s on one), though far less on a
    busy one (1.3–12× slower with both) — there, ``OMP_NUM_THREADS=1`` is the user's fix. A count
    the user chose is kept — ``OMP_NUM_THREADS`` (the CLI calls :func:`keep_thread_count` when it
    is set; torchrun sets 1 per process) or any other count than one per core
    (``torch.set_num_threads``).
    """
    import torch

    current = torch.get_num_threads()
    cores = cores or available_cores()
    chosen = _KEEP[0] or current != cores or cores <= ALL_CORES_UP_TO
    return current if chosen else max(1, cores - io_threads)


_KEEP = [False]  # set once by keep_thread_count


def keep_thread_count(keep: bool = True) -> None:
    """Tell :func:`math_threads` that torch's thread count is the user's choice (the CLI calls
    this when ``OMP_NUM_THREADS`` is set: nothing below the CLI reads the environment)."""
    _KEEP[0] = keep


@contextmanager
def cpu_math_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def leaves_cores_for_io(io_threads: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run the function with :func:`math_threads` (``io_threads``) intra-op threads."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with cpu_math_threads(math_threads(io_threads)):
                return function(*args, **kwargs)

        return wrapper

    return decorate
