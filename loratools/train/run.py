"""``train_adapter``: model folder + data file → trained PEFT adapter folder (what the CLI calls).

    files ─io→ model (LoRA injected) + packed data ─fit→ trained factors ─io→ adapter folder

Checkpoints go to ``<OUT>-checkpoints/step-NNNNNN/``: a PEFT adapter folder plus
``trainer_state.pt`` (optimizer moments, step, RNG; loaded with ``weights_only=True``).
``resume`` accepts one such folder, or the ``-checkpoints`` folder (the latest step is used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratools.errors import CheckpointError
from loratools.io.adapter_dir import load_adapter, save_adapter
from loratools.io.resolve import resolve_path
from loratools.io.writer import atomic_output, check_not_an_input, check_output_free
from loratools.progress import Progress, no_progress
from loratools.train.data import Packed, check_vocab, pack, read_examples, split_examples
from loratools.train.ddp import Workers, barrier, init_distributed, shutdown
from loratools.train.inject import inject_lora, load_lora_adapter, lora_layers, to_adapter
from loratools.train.loop import FitResult, fit
from loratools.train.model import LlamaForCausalLM, load_model
from loratools.train.options import TrainOptions

__all__ = ["TrainOptions", "TrainReport", "check_paths", "checkpoint_dir", "train_adapter"]

STATE_NAME = "trainer_state.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TrainReport:
    """The outcome of :func:`train_adapter` (the CLI's ``--json`` document)."""

    output: str
    steps: int
    losses: list[float]
    eval_losses: dict[int, float]
    tokens: int
    seconds: float
    tokens_per_s: float
    trainable_parameters: int
    modules: list[str]
    world_size: int
    rank: int = 0

    @property
    def eval_loss(self) -> float | None:
        """The last evaluation's loss (None without evaluation data)."""
        return self.eval_losses[max(self.eval_losses)] if self.eval_losses else None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: every field, the last training loss and the last eval loss."""
        return {**dataclasses.asdict(self), "final_loss": self.losses[-1], "eval_loss": self.eval_loss}


def checkpoint_dir(output: Path) -> Path:
    """Where periodic checkpoints of a run writing ``output`` go: ``<output>-checkpoints``."""
    return output.parent / f"{output.name}-checkpoints"


def _latest_checkpoint(path: Path) -> Path:
    if (path / STATE_NAME).is_file():
        return path
    steps = sorted(p for p in path.glob("step-*") if (p / STATE_NAME).is_file()) if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path}: no training checkpoint here (expected step-*/{STATE_NAME})")
    return steps[-1]


def _data(
    path: Path, model: LlamaForCausalLM, model_dir: Path, opts: TrainOptions, tokenizer: Path | None
) -> tuple[Packed, Packed | None]:
    """Read, split and pack the training file; ids are checked against the vocabulary."""
    c = model.config
    examples = read_examples(
        path, tokenizer=tokenizer or model_dir / "tokenizer.json", bos=c.bos_token_id, eos=c.eos_token_id
    )
    train_ex, eval_ex = split_examples(examples, opts.eval_fraction, opts.seed)
    train, held = pack(train_ex, opts.seq_len), pack(eval_ex, opts.seq_len) if eval_ex else None
    for name, packed in (("training data", train), ("held-out data", held)):
        if packed is not None:
            check_vocab(packed, c.vocab_size, f"{path} ({name})")
    return train, held


def _provenance(
    model: str, data: str, opts: TrainOptions, info: Workers, fit: FitResult, resumed: str | None
) -> dict[str, Any]:
    """How the adapter was trained: every option, the data, the final losses."""
    record: dict[str, Any] = {"method": "train", "base": model, "data": data, "world_size": info.world_size}
    record.update({k: v for k, v in dataclasses.asdict(opts).items() if k != "device"})
    record["targets"] = opts.targets if isinstance(opts.targets, str) else list(opts.targets)
    record.update(
        device=info.device.type,
        final_loss=fit.losses[-1] if fit.losses else None,
        eval_loss=fit.eval_losses[max(fit.eval_losses)] if fit.eval_losses else None,
        tokens=fit.tokens,
        resumed_from=resumed,
    )
    return record


def _build(
    model_dir: Path,
    opts: TrainOptions,
    info: Workers,
    init_adapter: str | Path | None,
    resume: str | Path | None,
) -> tuple[LlamaForCausalLM, dict[str, Any] | None, str | None]:
    """The model with LoRA layers: fresh, from an adapter, or from a checkpoint (+ its trainer state)."""
    torch.manual_seed(opts.seed)  # the same LoRA init on every rank
    net = load_model(model_dir, dtype=DTYPES[opts.dtype], device=info.device)
    if resume is not None:
        folder = _latest_checkpoint(Path(resume))
        load_lora_adapter(net, load_adapter(folder), dropout=opts.dropout)
        return net, torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True), str(folder)
    if init_adapter is not None:
        load_lora_adapter(net, load_adapter(init_adapter), dropout=opts.dropout)
        return net, None, None
    targets = opts.targets if isinstance(opts.targets, str) else list(opts.targets)
    inject_lora(
        net, targets, opts.rank, opts.alpha, dropout=opts.dropout, use_rslora=opts.use_rslora, init=opts.init
    )
    return net, None, None


def check_paths(
    model: str | Path, data: str | Path, output: Path, resume: str | Path | None, *, force: bool
) -> Path:
    """Refuse an existing ``output`` (unless ``force``) or one overlapping an input, before any
    work; returns the model's local folder.

    Raises:
        OutputExists: ``output`` exists and ``force`` is False.
        LoratoolsError: a missing model, an output overlapping the model, the data or ``resume``.
    """
    check_output_free(output, force=force)
    model_dir = resolve_path(model, what="model")
    check_not_an_input(output, [model_dir, Path(data), Path(resume) if resume else None])
    return model_dir


def train_adapter(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    opts: TrainOptions,
    *,
    tokenizer: Path | None = None,
    init_adapter: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    progress: Progress = no_progress,
    env: Mapping[str, str] | None = None,
) -> TrainReport:
    """Train a LoRA adapter on ``model`` with ``data`` and save it as a PEFT folder at ``output``.

    Args:
        model: a Llama-family model folder (config.json + safetensors) or Hub id.
        data: a .txt or .jsonl training file (see :mod:`loratools.train.data`).
        output: the adapter folder to write (refused if it exists, unless ``force``).
        opts: training options.
        tokenizer: tokenizer.json for text data (default: the model folder's).
        init_adapter: an existing adapter to continue training (its ranks and targets are used).
        resume: a checkpoint folder to continue exactly from.
        force: replace ``output``.
        progress: called once per step with a status line.
        env: the environment torchrun set (``RANK``, ``WORLD_SIZE``…): the CLI passes ``os.environ``;
            None trains in this one process.

    Raises:
        OutputExists: ``output`` exists and ``force`` is False (checked before training).
    """
    output = Path(output)
    model_dir = check_paths(model, data, output, resume, force=force)
    info = init_distributed(opts.device, env)
    try:
        net, state, resumed = _build(model_dir, opts, info, init_adapter, resume)
        net.set_gradient_checkpointing(opts.gradient_checkpointing)
        train, held = _data(
            Path(data), net, model_dir if model_dir.is_dir() else model_dir.parent, opts, tokenizer
        )

        def save(step: int, trainer_state: dict[str, Any]) -> None:
            if info.is_main:
                adapter = to_adapter(net, base_model=str(model), targets=opts.targets)
                with atomic_output(checkpoint_dir(output) / f"step-{step:06d}", force=True) as folder:
                    save_adapter(adapter, folder)
                    torch.save(trainer_state, folder / STATE_NAME)
            barrier(info)

        autocast = info.device.type == "cuda" and opts.dtype == "float32"  # fp32 master weights, bf16 math
        result = fit(
            net,
            train,
            held,
            opts.loop_options(autocast),
            info=info,
            state=state,
            progress=progress,
            save=save,
        )
        if info.is_main:
            record = _provenance(str(model), str(data), opts, info, result, resumed)
            save_adapter(
                to_adapter(net, base_model=str(model), targets=opts.targets, provenance=record),
                output,
                force=force,
            )
        barrier(info)
    finally:
        shutdown(info)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return TrainReport(
        output=str(output),
        steps=opts.steps,
        losses=result.losses,
        eval_losses=result.eval_losses,
        tokens=result.tokens,
        seconds=result.seconds,
        tokens_per_s=result.tokens_per_s,
        trainable_parameters=trainable,
        modules=list(lora_layers(net)),
        world_size=info.world_size,
        rank=info.rank,
    )
