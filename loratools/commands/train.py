"""``loratools train MODEL --data FILE -o OUT``: paths around the built-in loop (:mod:`loratools.train`).

Two steps, so the CLI can size its progress bar between them: :func:`open_train` refuses an
existing output or one overlapping an input and resolves the model (before any work),
:meth:`OpenTrain.run` trains (:func:`loratools.train.run.train_adapter`) and writes the adapter
atomically. :func:`train` does both. Under torchrun every process runs it; rank 0 writes and
alone gets a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loratools.progress import Progress, no_progress
from loratools.train.options import TrainOptions

if TYPE_CHECKING:  # torch loads only when a command runs: --help stays instant
    from loratools.train.run import TrainReport

__all__ = ["OpenTrain", "TrainJob", "open_train", "train"]


@dataclass(frozen=True)
class TrainJob:
    """What to train on, where to write, and how.

    Attributes:
        model: a Llama-family model folder (config.json + safetensors) or Hub id.
        data: a .txt or .jsonl training file (see :mod:`loratools.train.data`).
        output: the adapter folder to write.
        training: the loop's, the LoRA's and the data's options.
        tokenizer: tokenizer.json for text data (default: the model folder's).
        init_adapter: an existing adapter to continue training (its ranks and targets are used).
        resume: a checkpoint folder to continue exactly from.
        force: replace ``output`` if it exists.
        env: torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (the CLI passes ``os.environ``);
            empty for one process.
    """

    model: str
    data: Path
    output: Path
    training: TrainOptions = field(default_factory=TrainOptions)
    tokenizer: Path | None = None
    init_adapter: str | None = None
    resume: str | None = None
    force: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "output", Path(self.output))


@dataclass(frozen=True)
class OpenTrain:
    """The paths checked; ``total`` is the number of optimizer steps."""

    job: TrainJob

    @property
    def total(self) -> int:
        return self.job.training.steps

    def run(self, progress: Progress = no_progress) -> TrainReport | None:
        """Train and write the adapter; None on torchrun processes other than rank 0."""
        from loratools.train.run import train_adapter

        j = self.job
        report = train_adapter(
            j.model, j.data, j.output, j.training, tokenizer=j.tokenizer, init_adapter=j.init_adapter,
            resume=j.resume, force=j.force, progress=progress, env=j.env,
        )  # fmt: skip
        return report if report.rank == 0 else None


def open_train(job: TrainJob) -> OpenTrain:
    """Refuse an existing output (without ``force``) or one overlapping an input; resolve the model.

    Raises:
        OutputExists: ``output`` exists and ``force`` is False.
        LoratoolsError: a missing model, an output overlapping the model, the data or ``resume``.
    """
    from loratools.train.run import check_paths

    check_paths(job.model, job.data, job.output, job.resume, force=job.force)
    return OpenTrain(job)


def train(job: TrainJob, progress: Progress = no_progress) -> TrainReport | None:
    """Open and run in one call (for library use)."""
    return open_train(job).run(progress)
