"""What ``loratools train`` can set: :class:`LoopOptions` (the loop's knobs) and
:class:`TrainOptions` (those plus the model, LoRA and data ones), each field defined once.

No torch here, so the CLI reads its flags' defaults from these classes without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from loratools.errors import InvalidOptions

__all__ = ["DTYPES", "INITS", "LoopOptions", "TrainOptions"]

DTYPES = ("float32", "bfloat16")  # the base weights' dtype while training
INITS = ("kaiming", "gaussian")  # how A starts (loratools.train.layers)


@dataclass(frozen=True)
class LoopOptions:
    """The knobs of :func:`loratools.train.loop.fit`, defined once (:class:`TrainOptions` adds the
    model, LoRA and data ones). ``warmup_steps=None`` means 5% of ``steps``; the learning rate
    decays by a cosine to ``min_lr_ratio · lr``; ``autocast_bf16`` runs the forward and backward
    under bfloat16 autocast (float32 master weights)."""

    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InvalidOptions(
                    f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})"
                )
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number (got {self.lr})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be ≥ 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup must be ≥ 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "--max-grad-norm must be positive"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every must be ≥ 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise InvalidOptions("; ".join(problems))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)


@dataclass(frozen=True)
class TrainOptions(LoopOptions):
    """Everything ``loratools train`` can set: the loop's knobs (inherited, not repeated) and the
    model, LoRA and data ones; defaults follow the paper (r = 8 on W_q and W_v).

    Attributes:
        rank, alpha, dropout, use_rslora, init: the LoRA layers (scale = alpha / r, or alpha / √r).
        targets: leaf names, or one full-match regex over module paths (PEFT style).
        seq_len: tokens per packed sequence.
        eval_fraction: documents held out for the eval loss.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: the base weights' dtype (LoRA factors stay float32; on CUDA, float32 runs under
            bfloat16 autocast whatever ``autocast_bf16`` says).
        gradient_checkpointing: recompute activations in the backward pass.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    seq_len: int = 256
    eval_fraction: float = 0.1
    device: str = "auto"
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.seq_len < 2:
            problems.append(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.init not in INITS:
            problems.append(f"--init must be one of {', '.join(INITS)} (got {self.init})")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype})")
        if not self.targets:
            problems.append("--targets must name at least one module")
        try:
            super().__post_init__()
        except InvalidOptions as exc:
            problems.append(str(exc))
        if problems:
            raise InvalidOptions("; ".join(problems))

    def loop_options(self, autocast_bf16: bool = False) -> LoopOptions:
        """The loop's knobs, every one of :class:`LoopOptions` (a field cannot be dropped: they are
        the same fields); ``autocast_bf16`` turns autocast on besides the option."""
        values = {f.name: getattr(self, f.name) for f in fields(LoopOptions)}
        values["autocast_bf16"] = self.autocast_bf16 or autocast_bf16
        return LoopOptions(**values)
