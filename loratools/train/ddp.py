"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun`` starts N copies of ``loratools train`` and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…). The CLI passes that
environment in; :func:`init_distributed` hands it to :func:`loratools.distributed.join` (shared
with ``extract``), so nothing here reads ``os.environ``. Each process takes its own slice of every
global batch, DDP all-reduces the LoRA gradients (NCCL on GPUs, gloo on CPUs), and only rank 0
writes files.

    torchrun --nproc-per-node 2 -m loratools.cli.main train MODEL --data FILE -o OUT
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from loratools.device import resolve_device
from loratools.distributed import Workers, join, leave

__all__ = ["Workers", "all_reduce_sum", "barrier", "init_distributed", "shutdown", "wrap_model"]


def init_distributed(device: str = "auto", env: Mapping[str, str] | None = None) -> Workers:
    """Join the torchrun process group ``env`` describes; a single process when ``env`` is None
    or names no ``WORLD_SIZE`` above 1.

    Under torchrun with CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        env: the launcher's environment (the CLI passes ``os.environ``); None for one process.
    """
    return join(env or {}, resolve_device(device))


def wrap_model(model: nn.Module, info: Workers) -> nn.Module:
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


def all_reduce_sum(values: list[float], info: Workers) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, on the process's device)."""
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(info: Workers) -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a checkpoint)."""
    if info.distributed:
        dist.barrier()


def shutdown(info: Workers) -> None:
    """Leave the process group."""
    leave(info)
