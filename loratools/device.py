"""Choosing where the math runs."""

from __future__ import annotations

import torch

from loratools.errors import LoratoolsError

__all__ = ["resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda``/``cuda:N`` are checked to exist.

    Raises:
        LoratoolsError: a CUDA device was asked for but is not available.
    """
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
