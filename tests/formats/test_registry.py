"""Every format module reads through the same function, and load_adapter dispatches through the
registry: a format is a module plus one registry entry."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from loratools.formats import LoadContext
from loratools.formats.registry import FORMATS
from loratools.io.adapter_dir import load_adapter


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_format_readers_share_one_signature(family: str) -> None:
    params = inspect.signature(FORMATS[family]).parameters
    assert list(params)[:2] == ["tensors", "metadata"]
    assert params["context"].kind is inspect.Parameter.KEYWORD_ONLY


def test_load_adapter_dispatches_through_the_registry(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[LoadContext] = []
    real = FORMATS["peft"]

    def spy(tensors, metadata=None, *, context=None):
        seen.append(context)
        return real(tensors, metadata, context=context)

    monkeypatch.setitem(FORMATS, "peft", spy)
    adapter = load_adapter(fixtures_dir / "adapter", base_names=["x.weight"])
    (context,) = seen
    assert context.source == str(fixtures_dir / "adapter") and context.base_names == ["x.weight"]
    assert context.config["peft_type"] == "LORA" and not context.keep_stems
    assert adapter.weights  # the real reader ran
