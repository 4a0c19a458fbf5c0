"""The training loop: AdamW on the LoRA factors only, warmup + cosine, accumulation, clipping.

One optimizer step sees a *global batch* of ``batch_size · grad_accum · world_size`` packed rows,
drawn from a seeded permutation of the data that depends only on ``(seed, step)``. The loss is
the mean cross-entropy over the global batch's target tokens::

    L = Σ_rows Σ_t CE(logits[t], labels[t+1]) / (target tokens in the global batch)

and each micro-batch contributes its share of that sum, so 1 process × 2 micro-batches, 2
processes × 1, and 1 × 1 with a double batch all take the same step (up to float summation
order). With the optimizer state, step and RNG state saved in a checkpoint, ``--resume``
continues the identical loss curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from loratools.progress import Progress, no_progress
from loratools.train.data import IGNORE, Packed
from loratools.train.ddp import Workers, all_reduce_sum, wrap_model
from loratools.train.inject import lora_parameters
from loratools.train.options import LoopOptions

__all__ = ["FitResult", "LoopOptions", "batch_rows", "evaluate", "fit", "lr_at"]

SaveHook = Callable[[int, dict[str, Any]], None]


@dataclass
class FitResult:
    """What happened: the mean training loss per step, eval losses by step, throughput."""

    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def lr_at(step: int, opts: LoopOptions) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio · lr`` at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_rows(step: int, size: int, n: int, seed: int) -> torch.Tensor:
    """Row indices of the global batch at ``step``: positions ``step·size …`` of a stream of
    per-epoch permutations of ``range(n)``. Depends only on its arguments (exact resume)."""
    positions = range(step * size, (step + 1) * size)
    return torch.stack([_permutation(seed, p // n, n)[p % n] for p in positions])


def _token_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, autocast: Any) -> torch.Tensor:
    """Σ cross-entropy over target positions: position t predicts labels[t + 1]."""
    with autocast:
        return model(ids, labels)  # the model's fused head + loss (see train/loss.py)


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: Packed, batch_size: int, info: Workers, bf16: bool = False) -> float:
    """Mean cross-entropy over ``data``'s target tokens; rows are shared out by rank."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    rows = torch.arange(info.rank, len(data), info.world_size)
    for chunk in rows.split(batch_size):
        ids, labels = data.input_ids[chunk].to(info.device), data.labels[chunk].to(info.device)
        total += float(_token_loss_sum(model, ids, labels, _autocast(info.device, bf16)))
        count += int((labels[:, 1:] != IGNORE).sum())
    total, count = all_reduce_sum([total, count], info)
    model.train(was_training)
    return total / max(count, 1.0)


def fit(
    model: nn.Module,
    train: Packed,
    evaluation: Packed | None,
    opts: LoopOptions,
    *,
    info: Workers | None = None,
    state: dict[str, Any] | None = None,
    progress: Progress = no_progress,
    save: SaveHook | None = None,
) -> FitResult:
    """Train ``model``'s LoRA factors in place for ``opts.steps`` optimizer steps.

    Args:
        model: a model with LoRA layers injected (frozen elsewhere), on ``info.device``, whose
            ``forward(input_ids, labels)`` returns the summed next-token loss (LlamaForCausalLM).
        train: packed training rows (all of them, on every rank; each rank reads its slice).
        evaluation: held-out rows for the eval loss, or None.
        opts: the loop's options.
        info: the process's place under torchrun (default: one process on CPU).
        state: a trainer state from a checkpoint's ``save`` call, to resume exactly.
        progress: called once per step with a one-line status (loss, lr, tokens/s).
        save: called as ``save(step, trainer_state)`` every ``opts.save_every`` steps.

    Returns:
        The loss history and throughput.
    """
    info = info or Workers()
    params = lora_parameters(model)
    net = wrap_model(model, info)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    result, start = FitResult(), 0
    if state is not None:  # resume: optimizer moments, step, history and RNG continue where they were
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        result.losses = list(state["losses"])
        result.eval_losses = {int(k): v for k, v in state["eval_losses"].items()}
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and info.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], info.device)
    global_batch = opts.batch_size * opts.grad_accum * info.world_size
    autocast = _autocast(info.device, opts.autocast_bf16)
    model.train()
    started = time.perf_counter()
    for step in range(start, opts.steps):
        lr = lr_at(step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_rows(step, global_batch, len(train), opts.seed)
        n_targets = max(1, int((train.labels[rows, 1:] != IGNORE).sum()))  # global normaliser
        mine = rows.view(opts.grad_accum, info.world_size, opts.batch_size)[:, info.rank]  # (accum, batch)
        loss_sum = 0.0
        for micro, chunk in enumerate(mine):
            ids, labels = train.input_ids[chunk].to(info.device), train.labels[chunk].to(info.device)
            sync = micro == opts.grad_accum - 1 or not info.distributed
            with nullcontext() if sync else net.no_sync():  # type: ignore[operator]
                loss = _token_loss_sum(net, ids, labels, autocast) / n_targets
                # DDP averages gradients over ranks; scaling by world_size turns that into the sum.
                (loss * info.world_size).backward()
            loss_sum += float(loss.detach())
        (loss_sum,) = all_reduce_sum([loss_sum], info)
        if opts.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        result.tokens += global_batch * train.input_ids.shape[1]
        result.seconds = time.perf_counter() - started
        done = step + 1
        if evaluation is not None and len(evaluation) and opts.eval_every and done % opts.eval_every == 0:
            result.eval_losses[done] = evaluate(model, evaluation, opts.batch_size, info, opts.autocast_bf16)
        if info.is_main:  # one bar, drawn by rank 0
            progress(
                f"step {done}/{opts.steps} loss {loss_sum:.4f} lr {lr:.2e} {result.tokens_per_s:,.0f} tok/s"
            )
        if save is not None and opts.save_every and done % opts.save_every == 0 and done < opts.steps:
            save(done, _trainer_state(done, optimizer, result, info))
    if evaluation is not None and len(evaluation) and opts.steps not in result.eval_losses:
        result.eval_losses[opts.steps] = evaluate(
            model, evaluation, opts.batch_size, info, opts.autocast_bf16
        )
    return result


def _trainer_state(
    step: int, optimizer: torch.optim.Optimizer, result: FitResult, info: Workers
) -> dict[str, Any]:
    """Everything beyond the LoRA factors that an exact resume needs (loadable with weights_only)."""
    state: dict[str, Any] = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "losses": list(result.losses),
        "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "rng": torch.get_rng_state(),
    }
    if info.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(info.device)
    return state
