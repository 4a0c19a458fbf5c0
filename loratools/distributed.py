"""Cooperating ``torchrun`` processes: who this process is, and the process group it joins.

Under ``torchrun --nproc-per-node N`` every process runs the same command and learns its place
from ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. Extraction shares modules round-robin and
gathers the factors to rank 0; training shards batches and lets DDP average gradients. Either
way rank 0 alone writes. A single process is the N = 1 case and never touches
``torch.distributed``. The environment is passed in by the caller, so nothing here reads globals.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from loratools.errors import LoratoolsError

__all__ = ["Workers", "join", "leave", "workers_from_env"]

T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among ``world_size`` cooperating processes.

    Attributes:
        rank: this process's index, 0 ≤ rank < world_size; rank 0 writes the output.
        world_size: how many processes share the work.
        local_rank: its index on this machine (which GPU it drives).
        device: where this process computes (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th one, starting at ``rank``."""
        return list(items[self.rank :: self.world_size])

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def join(env: Mapping[str, str], device: torch.device) -> Workers:
    """Join the process group torchrun describes in ``env``, or stay a single process.

    Initialises gloo (CPU) or NCCL (CUDA, one device per ``LOCAL_RANK``) unless a group exists.

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
        return Workers(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(hours=2)
        )
    return Workers(rank, world_size, local_rank, device)


def leave(workers: Workers) -> None:
    """Tear down the process group ``join`` made (nothing for a single process)."""
    if workers.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def workers_from_env(env: Mapping[str, str], device: torch.device) -> Iterator[Workers]:
    """``join`` on entry, ``leave`` on exit."""
    workers = join(env, device)
    try:
        yield workers
    finally:
        leave(workers)
