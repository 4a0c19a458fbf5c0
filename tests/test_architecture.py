"""The import rules of docs/design.md, checked on the source: math and formats stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loratools"
FORBIDDEN = {"safetensors", "click", "rich", "huggingface_hub"}
PURE = ["linalg.py", "adapter.py", "formats", "ops"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def python_files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", PURE)
def test_pure_modules_import_no_io_or_ui_libraries(entry: str) -> None:
    offenders = {str(f.relative_to(PACKAGE)): imported_roots(f) & FORBIDDEN for f in python_files(entry)}
    assert {f: libs for f, libs in offenders.items() if libs} == {}


def test_only_render_imports_rich() -> None:
    users = [str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if "rich" in imported_roots(f)]
    assert users == ["cli/render.py"]


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, loratools, loratools.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
