"""``target_modules`` matching gives PEFT's own answer (``check_target_module_exists``) for random
module names and targets: lists of names and suffixes, and regexes."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.formats.targets import matches_target

# A small alphabet of parts so that names share suffixes and prefixes often ("proj" vs "q_proj").
PARTS = ["model", "layers", "0", "1", "12", "self_attn", "q_proj", "proj", "q", "mlp", "up_proj", "lm_head"]
names = st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map(".".join)


@st.composite
def regexes(draw: st.DrawFn) -> str:
    """A full-match regex built from escaped parts and wildcards: ``.*\\.q_proj``, ``model\\..*``."""
    pieces = draw(
        st.lists(st.sampled_from([*map(re.escape, PARTS), r"\.", ".*", r"(q|up)_proj", r"\d+"]), max_size=5)
    )
    return "".join(pieces)


targets = st.one_of(
    st.lists(st.one_of(names, st.sampled_from(["", "."])), max_size=4),  # leaf names or dotted suffixes
    regexes(),
)


def peft_answer(module: str, target: str | list[str]) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    config = SimpleNamespace(
        target_modules=target,
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return bool(check_target_module_exists(config, module))


@settings(max_examples=400, deadline=None)
@given(module=names, target=targets)
def test_matching_agrees_with_peft(module: str, target: str | list[str]) -> None:
    pytest.importorskip("peft")
    assert matches_target(module, target) == peft_answer(module, target)


@pytest.mark.parametrize(
    ("module", "target", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),  # a dotted suffix
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix starts at a dot
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # a regex matches the whole name
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
    ],
)
def test_matching_examples(module: str, target: str | list[str], expected: bool) -> None:
    assert matches_target(module, target) is expected
