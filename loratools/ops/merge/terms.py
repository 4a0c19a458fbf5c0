"""What a merge does: the adapters with their signed weights, the options, and the update they
make to one base tensor (``Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ``, or a whole ``modules_to_save`` replacement)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from loratools.adapter import Adapter, ModuleWeight
from loratools.errors import LoratoolsError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TensorInfo(Protocol):
    """What the merge plan needs to know of a base tensor, from the header alone
    (:class:`loratools.io.safetensors_file.TensorSpec` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...


@dataclass(frozen=True)
class MergeTerm:
    """One adapter and the signed weight it enters with: ``+w`` adds ``w·s·B·A``, ``−w`` removes it.

    Attributes:
        adapter: the adapter.
        weight: the signed multiplier wᵢ.
        label: how messages name it (the path the user gave).
    """

    adapter: Adapter
    weight: float = 1.0
    label: str = "adapter"


@dataclass(frozen=True)
class MergeOptions:
    """Options of merge / unmerge / swap.

    Attributes:
        dtype: output dtype of floating tensors; None keeps each tensor's own.
        device: where the matmuls run (``cpu``, ``cuda``, ``cuda:N``).
        lost_warning: warn when more than this fraction of the update is lost to rounding.
        threads: torch's intra-op threads for the CPU math; 0 means the cores less the two that
            the reader and writer threads keep busy (at least 1). Oversubscribed OpenMP regions
            slow every op several-fold (a 16×16 Gram matrix took 80 ms instead of 0.05 ms).
        keep_quantization: requantize adapted weights of a quantized base (GGUF, bitsandbytes,
            FP8) into its own types instead of writing float weights, and report what survives.
        tokenizer: a folder whose tokenizer files replace the base's in the output (the
            fine-tune's, when its vocabulary grew; see :mod:`loratools.ops.merge.growth`).
    """

    dtype: torch.dtype | None = None
    device: str = "cpu"
    lost_warning: float = 0.5
    threads: int = 0
    keep_quantization: bool = False  # write the base's own quantization back (requant.py)
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise LoratoolsError(
                f"--dtype {self.dtype}: not a floating dtype; use float32, bfloat16 or float16"
            )
        if not 0.0 < self.lost_warning <= 1.0:
            raise LoratoolsError(f"lost_warning={self.lost_warning}: must be in (0, 1]")
        if self.threads < 0:
            raise LoratoolsError(f"threads={self.threads}: must be 0 (automatic) or more")

    def intra_op_threads(self, cores: int) -> int:
        """The thread count for the math on a machine with ``cores`` cores."""
        return self.threads or max(1, cores - 2)


@dataclass
class TensorUpdate:
    """Everything that happens to one base tensor.

    Attributes:
        loras: (factors, signed weight, transposed) per adapter touching it; ``transposed`` for
            fan_in_fan_out bases, which store the weight as (in, out).
        replacement: a ``modules_to_save`` tensor that replaces the base tensor whole.
    """

    loras: list[tuple[ModuleWeight, float, bool]] = field(default_factory=list)
    replacement: torch.Tensor | None = None
