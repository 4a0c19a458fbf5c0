"""Every tolerance in tests/ states its reason (issue 13).

A tolerance is either one of the named, derived dicts of tests/tolerances.py (``**F32_MATMUL``,
``rtol=F32_MATMUL["rtol"]``) or a number with a comment saying why that number: on the same line, on the
line above, or on (or just above) the first line of the statement it sits in. Read from the sources with
``ast`` + ``tokenize``; what counts as a tolerance number:

- any number inside an ``rtol=``, ``atol=``, ``abs=`` or ``rel=`` argument (``rtol=0`` too: exactness
  needs a reason as much as slack does);
- a float literal that is small (0 < |x| < 0.1) or a slack factor (1 < |x| ≤ 1.1) inside an ordering
  comparison (<, <=, >, >=) of an ``assert``, or passed to a helper whose name says it compares
  (``*close*``, ``*approx*``, ``assert*``); numbers inside list/tuple/set/dict displays are data, not slack.

Not covered: the dtype defaults of ``torch.testing.assert_close`` and ``pytest.approx`` called without a
tolerance (they are stated per dtype by torch and pytest), and thresholds that are not slack (``> 0.9``).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KEYWORDS = {"rtol", "atol", "abs", "rel"}
COMPARING = ("close", "approx", "assert")
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
# Comments that carry no reason.
TOOL_COMMENTS = ("# noqa", "# type:", "# pragma", "# fmt:")

# Test files exempted while other branches edited them; empty since they merged. Do not add to it.
NOT_YET: set[str] = set()
# Where the numbers are derived, in docstrings and comments of their own.
EXEMPT = {"tolerances.py", "_tolerances.py", "test_tolerances.py"}


DATA = (ast.List, ast.Tuple, ast.Set, ast.Dict)


def _numbers(node: ast.AST, skip_data: bool = False) -> list[ast.Constant]:
    """Numeric literals under ``node``; with ``skip_data``, not those inside list/tuple/set/dict
    displays (expected values such as ``torch.tensor([10.0, 0.01])``, not tolerances)."""
    if skip_data and isinstance(node, DATA):
        return []
    if isinstance(node, ast.Constant):
        is_number = isinstance(node.value, int | float) and not isinstance(node.value, bool)
        return [node] if is_number else []
    return [n for child in ast.iter_child_nodes(node) for n in _numbers(child, skip_data)]


def _is_slack(value: float) -> bool:
    """A small absolute slack (1e-6, 2e-2) or a relative factor just above one (1.001, 1 + ...)."""
    return isinstance(value, float) and (0 < abs(value) < 0.1 or 1 < abs(value) <= 1.1)


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def tolerance_lines(tree: ast.AST) -> dict[int, int]:
    """Line of each tolerance number → first line of the statement that holds it."""
    found: dict[int, int] = {}

    def visit(node: ast.AST, statement: int) -> None:
        if isinstance(node, ast.stmt):
            statement = node.lineno
        hits: list[ast.Constant] = []
        if isinstance(node, ast.keyword) and node.arg in KEYWORDS:
            hits = _numbers(node.value)
        elif isinstance(node, ast.Assert):
            compares = [n for n in ast.walk(node.test) if isinstance(n, ast.Compare)]
            ordered = [n for n in compares if any(isinstance(op, ORDERING) for op in n.ops)]
            hits = [c for n in ordered for c in _numbers(n, skip_data=True)]
        elif isinstance(node, ast.Call) and any(word in _callee(node).lower() for word in COMPARING):
            hits = [c for arg in node.args for c in _numbers(arg, skip_data=True)]
        for constant in hits:
            if isinstance(node, ast.keyword) or _is_slack(constant.value):
                found.setdefault(constant.lineno, statement)
        for child in ast.iter_child_nodes(node):
            visit(child, statement)

    visit(tree, 1)
    return found


def comment_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {
        t.start[0] for t in tokens if t.type == tokenize.COMMENT and not t.string.startswith(TOOL_COMMENTS)
    }


def unexplained(source: str) -> list[int]:
    """Lines holding a tolerance number with no comment on it, above it, or at its statement's start."""
    comments = comment_lines(source)
    return sorted(
        line
        for line, statement in tolerance_lines(ast.parse(source)).items()
        if not comments & {line, line - 1, statement, statement - 1}
    )


def _sources() -> list[Path]:
    return [
        p
        for p in sorted(TESTS.rglob("*.py"))
        if p.name not in EXEMPT and str(p.relative_to(TESTS)) not in NOT_YET
    ]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(TESTS)))
def test_every_tolerance_states_its_reason(path: Path) -> None:
    source = path.read_text()
    lines = source.splitlines()
    missing = [f"{path.name}:{n}: {lines[n - 1].strip()}" for n in unexplained(source)]
    assert missing == [], "use a named tolerance (tests/tolerances.py) or say why that number:\n" + "\n".join(
        missing
    )


# -- the check itself can fail -----------------------------------------------------------------------

BARE = """
def test_x(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    assert (a - b).abs().max() < 1e-5
    assert err <= 1.01 * best
    assert_rel_close(a, b, 2e-3)
    assert a == pytest.approx(b, abs=1e-9)
"""


def test_a_bare_tolerance_is_caught() -> None:
    assert unexplained(BARE) == [3, 4, 5, 6, 7]


def test_a_reason_or_a_named_tolerance_passes() -> None:
    explained = """
def test_x(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)  # float32 sums of 64 terms
    # a rank-2 product rebuilt in float32: rounding only
    assert (a - b).abs().max() < 1e-5
    assert_close(  # bf16 output rounding
        a,
        b,
        atol=3e-3,
    )
    torch.testing.assert_close(a, b, **F32_MATMUL)
    torch.testing.assert_close(a, b, rtol=F32_MATMUL["rtol"], atol=F32_MATMUL["atol"])
    assert x > 0.5 and n == 3 and lr == 1e-3
    torch.testing.assert_close(s, torch.tensor([10.0, 0.01]), **F32_MATMUL)
"""
    assert unexplained(explained) == []


def test_tool_comments_are_no_reason() -> None:
    assert unexplained("assert x < 1e-5  # noqa: PLR2004\n") == [1]


def _without_comments(source: str) -> str:
    """``source`` with every comment blanked out, line numbers kept."""
    lines = source.splitlines(keepends=True)
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:
            row, col = t.start
            lines[row - 1] = lines[row - 1][:col] + lines[row - 1][t.end[1] :]
    return "".join(lines)


@pytest.mark.parametrize("name", ["test_linalg.py", "ops/test_spectrum.py", "ops/test_merge.py"])
def test_real_test_files_fail_without_their_reasons(name: str) -> None:
    source = (TESTS / name).read_text()
    assert unexplained(source) == []
    assert len(unexplained(_without_comments(source))) >= 5
