"""Reading, tokenizing, splitting and packing training data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.errors import MissingExtra
from loratools.train.data import (
    IGNORE,
    DataError,
    Example,
    check_vocab,
    pack,
    read_examples,
    split_examples,
)

BOS, EOS = 1, 2


@pytest.fixture
def tokenizer(fixtures_dir: Path) -> Path:
    return fixtures_dir / "train" / "tokenizer.json"


def test_txt_documents_are_split_on_blank_lines(tmp_path: Path, tokenizer: Path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("t0 t1\nt2\n\n\n  t5 t6  \n\n")
    examples = read_examples(data, tokenizer=tokenizer, bos=BOS, eos=EOS)
    assert [e.ids for e in examples] == [[BOS, 3, 4, 5, EOS], [BOS, 8, 9, EOS]]
    assert examples[0].targets == [False, True, True, True, True]  # bos is never predicted


def test_the_three_jsonl_kinds(fixtures_dir: Path, tokenizer: Path) -> None:
    text = read_examples(fixtures_dir / "train" / "count.jsonl", tokenizer=tokenizer, bos=BOS, eos=EOS)
    ids = read_examples(fixtures_dir / "train" / "ids.jsonl")
    assert [e.ids for e in text] == [e.ids for e in ids]  # the fixture's two spellings agree
    prompts = read_examples(fixtures_dir / "train" / "prompts.jsonl", tokenizer=tokenizer, bos=BOS, eos=EOS)
    assert [e.ids for e in prompts] == [e.ids for e in ids]
    first = prompts[0]
    n_prompt = 1 + len(first.ids[1:-1]) // 2
    assert first.targets == [False] * n_prompt + [True] * (len(first.ids) - n_prompt)


def test_prompt_tokens_carry_no_loss_after_packing(tmp_path: Path, tokenizer: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "t0 t1 t2", "completion": "t3"}) + "\n")
    packed = pack(read_examples(data, tokenizer=tokenizer, bos=BOS, eos=EOS), seq_len=8)
    assert packed.input_ids.tolist() == [[BOS, 3, 4, 5, 6, EOS, 0, 0]]
    assert packed.labels.tolist() == [[IGNORE, IGNORE, IGNORE, IGNORE, 6, EOS, IGNORE, IGNORE]]
    assert packed.loss_tokens == 2


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=30), min_size=1, max_size=12),
    seq_len=st.integers(2, 40),
)
def test_packing_keeps_the_token_stream(docs: list[list[int]], seq_len: int) -> None:
    examples = [Example(d, [i % 3 != 0 for i in range(len(d))]) for d in docs]
    packed = pack(examples, seq_len)
    stream = [i for d in docs for i in d]
    assert packed.input_ids.shape == (-(-len(stream) // seq_len), seq_len)
    assert packed.input_ids.flatten()[: len(stream)].tolist() == stream
    expected_labels = [i if t else IGNORE for e in examples for i, t in zip(e.ids, e.targets, strict=True)]
    flat = packed.labels.flatten()
    assert flat[: len(stream)].tolist() == expected_labels
    assert bool((flat[len(stream) :] == IGNORE).all())  # padding never counts


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 200), fraction=st.floats(0.01, 0.9), seed=st.integers(0, 5))
def test_split_is_deterministic_disjoint_and_complete(n: int, fraction: float, seed: int) -> None:
    examples = [Example([i], [True]) for i in range(n)]
    train, held = split_examples(examples, fraction, seed)
    again = split_examples(examples, fraction, seed)
    assert (train, held) == again
    assert 1 <= len(held) <= n - 1
    assert sorted(e.ids[0] for e in train + held) == list(range(n))


def test_no_split_when_fraction_is_zero() -> None:
    examples = [Example([1], [True])]
    assert split_examples(examples, 0.0, 0) == (examples, [])
    with pytest.raises(DataError, match="at least 2"):
        split_examples(examples, 0.1, 0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"text": "t1"}\nnot json\n', r"a\.jsonl:2: not valid JSON"),
        ("b.jsonl", '{"body": "t1"}\n', r"b\.jsonl:1: expected a 'text'"),
        ("c.jsonl", '{"input_ids": [1, -2]}\n', "non-negative integers"),
        ("d.jsonl", "[1, 2]\n", "JSON object"),
        ("e.csv", "t1\n", "unknown data format"),
        ("f.txt", "\n\n\n", "no training examples"),
    ],
)
def test_bad_files_say_where_and_why(tmp_path: Path, tokenizer: Path, name: str, content: str, message: str):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(tmp_path / name, tokenizer=tokenizer)


def test_text_needs_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(DataError, match="--tokenizer"):
        read_examples(tmp_path / "a.txt")
    with pytest.raises(DataError, match="no tokenizer.json"):
        read_examples(tmp_path / "a.txt", tokenizer=tmp_path / "tokenizer.json")


def test_pre_tokenized_data_needs_no_tokenizers_package(tmp_path: Path, monkeypatch, tokenizer: Path) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 5, 2]}\n')
    assert read_examples(tmp_path / "ids.jsonl")[0].ids == [1, 5, 2]
    (tmp_path / "a.txt").write_text("t1\n")
    with pytest.raises(MissingExtra, match=r"loratools\[train\]"):
        read_examples(tmp_path / "a.txt", tokenizer=tokenizer)


def test_ids_outside_the_vocabulary_are_refused() -> None:
    packed = pack([Example([3, 70], [True, True])], 4)
    check_vocab(packed, 71, "x")
    with pytest.raises(DataError, match="token id 70 is outside the model's vocabulary of 64"):
        check_vocab(packed, 64, "x")
    assert packed.input_ids.dtype == torch.long
