"""Splitting whole-model work across ``torchrun`` processes and gathering the results.

Under ``torchrun --nproc-per-node N`` every process runs the same command. Each takes every
N-th work item (round-robin, so the layers of a deep model spread evenly), and the results are
gathered to rank 0, which alone writes the output. A single process is the N = 1 case and
never touches ``torch.distributed``.

The environment is read by the caller (the CLI) and passed in, so nothing here reads globals.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from loratools.errors import LoratoolsError

__all__ = ["Workers", "workers_from_env"]

T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among ``world_size`` cooperating processes.

    Attributes:
        rank: this process's index, 0 ≤ rank < world_size; rank 0 writes the output.
        world_size: how many processes share the work.
        device: where this process computes (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th one, starting at ``rank``."""
        return list(items[self.rank :: self.world_size])

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def workers_from_env(env: Mapping[str, str], device: torch.device) -> Iterator[Workers]:
    """The process group torchrun describes in ``env`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Without ``WORLD_SIZE`` (or with 1) this is a single process and nothing is initialised.
    Otherwise it initialises gloo (CPU) or NCCL (CUDA, one device per ``LOCAL_RANK``) and tears
    the group down on exit.

    Args:
        env: the process environment, e.g. ``os.environ``.
        device: the device asked for; a CUDA device becomes ``cuda:LOCAL_RANK``.

    Raises:
        LoratoolsError: malformed torchrun variables.
    """
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise LoratoolsError(
            f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc}); launch with torchrun"
        ) from exc
    if world_size <= 1:
        yield Workers(device=device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        _backend(device), rank=rank, world_size=world_size, timeout=timedelta(hours=2)
    )
    try:
        yield Workers(rank, world_size, device)
    finally:
        torch.distributed.destroy_process_group()
