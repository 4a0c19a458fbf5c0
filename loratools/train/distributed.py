"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun`` starts N copies of ``loratools train`` and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…); this module is the one
place that reads it. Each process takes its own slice of every global batch, DDP all-reduces the
LoRA gradients (NCCL on GPUs, gloo on CPUs), and only rank 0 writes files.

    torchrun --nproc-per-node 2 -m loratools.cli.main train MODEL --data FILE -o OUT
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from loratools.device import resolve_device

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "init_distributed", "shutdown", "wrap_model"]

CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; otherwise a single process.

    Under torchrun with CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device)
    if world == 1:
        return DistInfo(device=chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, chosen)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel`` over the trainable (LoRA) parameters, or the model itself."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # RoPE tables are the only buffers and are equal everywhere: no per-step buffer broadcast.
    # (torch ≥ 2.13 renamed broadcast_buffers to forward_sync_buffers.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    quiet: dict[str, Any] = {flag: False}
    return DistributedDataParallel(model, device_ids=ids, **quiet)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, on the process's device)."""
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a checkpoint)."""
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
