"""Training data: read documents, tokenize, split off a held-out set, pack into fixed-length rows.

Accepted files:
- ``.txt``: documents separated by blank lines;
- ``.jsonl`` with ``{"text": ...}`` per line; or ``{"prompt": ..., "completion": ...}``, where
  the loss counts completion tokens only; or pre-tokenized ``{"input_ids": [...]}``.

Text is tokenized with the model's ``tokenizer.json`` (the ``tokenizers`` package, extra
``train``); each document becomes ``[bos] tokens [eos]`` with the config's special ids. Rows are
packed back to back (documents may span rows, as in GPT pre-training) and the last, partial row
is padded with positions that carry no loss. Labels use ``-100`` for "no loss here"; the loss at
position t predicts ``labels[t + 1]`` from ``input_ids[: t + 1]``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratools.errors import LoratoolsError, MissingExtra

__all__ = [
    "IGNORE",
    "DataError",
    "Example",
    "Packed",
    "load_tokenizer",
    "pack",
    "read_examples",
    "split_examples",
]

IGNORE = -100  # the label of a position that contributes no loss (cross_entropy's ignore_index)
Encode = Callable[[str], list[int]]


class DataError(LoratoolsError):
    """Training data that cannot be read or used."""


@dataclass(frozen=True)
class Example:
    """One document: token ids and, per token, whether the model is trained to predict it."""

    ids: list[int]
    targets: list[bool]


@dataclass(frozen=True)
class Packed:
    """Fixed-length rows: ``input_ids`` and ``labels``, both (rows, seq_len) int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def loss_tokens(self) -> int:
        """Positions that carry a loss (labels shifted by one, as the loss sees them)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def load_tokenizer(path: Path) -> Encode:
    """An ``encode(text) -> ids`` function from a ``tokenizer.json`` (no special tokens added).

    Raises:
        MissingExtra: the ``tokenizers`` package is not installed.
        DataError: the file is missing or unreadable.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MissingExtra("tokenizers", "train", "tokenizing text training data") from exc
    if not path.is_file():
        raise DataError(
            f"{path}: no tokenizer.json; pass --tokenizer FILE or use pre-tokenized .jsonl with input_ids"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise DataError(f"{path}: not a readable tokenizer.json ({exc})") from exc
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def _document(
    prompt: list[int], completion: list[int], bos: int | None, eos: int | None, prompt_loss: bool
) -> Example:
    """``[bos] prompt completion [eos]``; targets are the completion and eos (and the prompt if asked)."""
    head = ([bos] if bos is not None else []) + prompt
    tail = completion + ([eos] if eos is not None else [])
    targets = [False] * (1 if bos is not None else 0) + [prompt_loss] * len(prompt) + [True] * len(tail)
    return Example(head + tail, targets)


def _parse_jsonl(
    lines: Iterable[str], path: Path, encode: Callable[[], Encode], bos: int | None, eos: int | None
) -> list[Example]:
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        if "input_ids" in record:
            ids = record["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise DataError(f"{path}:{number}: input_ids must be a list of non-negative integers")
            examples.append(Example(list(ids), [True] * len(ids)))
        elif "prompt" in record and "completion" in record:
            tok = encode()
            examples.append(_document(tok(record["prompt"]), tok(record["completion"]), bos, eos, False))
        elif "text" in record:
            examples.append(_document([], encode()(record["text"]), bos, eos, True))
        else:
            raise DataError(
                f"{path}:{number}: expected a 'text', 'prompt'+'completion' or 'input_ids' field; "
                f"got {sorted(record)[:5]}"
            )
    return examples


def read_examples(
    path: str | Path, *, tokenizer: Path | None = None, bos: int | None = None, eos: int | None = None
) -> list[Example]:
    """Read and tokenize a training file (see the module docstring for the formats).

    Args:
        path: a ``.txt`` or ``.jsonl`` file.
        tokenizer: the ``tokenizer.json`` to use for text (not needed for ``input_ids`` files).
        bos: id put before every text document (None: none).
        eos: id put after every text document (None: none).

    Raises:
        DataError: unreadable, empty or malformed files.
    """
    path = Path(path)
    cache: list[Encode] = []

    def encode() -> Encode:  # the tokenizer loads only when some record needs it
        if not cache:
            if tokenizer is None:
                raise DataError(f"{path}: text data needs a tokenizer.json (pass --tokenizer FILE)")
            cache.append(load_tokenizer(tokenizer))
        return cache[0]

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read training data ({exc})") from exc
    if path.suffix == ".jsonl":
        examples = _parse_jsonl(text.splitlines(), path, encode, bos, eos)
    elif path.suffix == ".txt":
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
        examples = [_document([], encode()(d), bos, eos, True) for d in docs]
    else:
        raise DataError(f"{path}: unknown data format; use .txt (blank-line separated) or .jsonl")
    if not examples:
        raise DataError(f"{path}: no training examples found")
    return examples


def split_examples(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A deterministic held-out split by document: ``round(n · eval_fraction)`` examples (≥ 1 if > 0)."""
    if eval_fraction <= 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    if n_eval < 1:
        raise DataError("a held-out split needs at least 2 examples; pass --eval-fraction 0")
    held = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def pack(examples: list[Example], seq_len: int, pad_id: int = 0) -> Packed:
    """Concatenate examples and cut the stream into rows of ``seq_len`` tokens.

    The last row is padded with ``pad_id`` (label ``IGNORE``); causal attention means padding
    after a position never changes that position's output.

    Returns:
        Packed rows; labels are the ids where a token is a target, else ``IGNORE``.
    """
    ids = torch.tensor([i for e in examples for i in e.ids], dtype=torch.long)
    targets = torch.tensor([t for e in examples for t in e.targets], dtype=torch.bool)
    rows = max(1, -(-len(ids) // seq_len))
    input_ids = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((rows * seq_len,), IGNORE, dtype=torch.long)
    input_ids[: len(ids)] = ids
    labels[: len(ids)] = torch.where(targets, ids, torch.full_like(ids, IGNORE))
    return Packed(input_ids.view(rows, seq_len), labels.view(rows, seq_len))


def check_vocab(packed: Packed, vocab_size: int, where: str) -> None:
    """Raise DataError when an id is outside the model's vocabulary (it would crash the embedding)."""
    top = int(packed.input_ids.max()) if packed.input_ids.numel() else 0
    if top >= vocab_size:
        raise DataError(f"{where}: token id {top} is outside the model's vocabulary of {vocab_size}")
