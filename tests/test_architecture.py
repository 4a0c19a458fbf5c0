"""The import rules of docs/design.md, checked on the source: math and formats stay pure, and
loratools' own packages import each other only as the layer table in docs/design.md allows."""

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


# -- layers between loratools' own packages (the table in docs/design.md, "Layers") ---------------

# Every top-level module or package of loratools, by layer.
LAYER_OF = {
    "__init__": "core",  # ``import loratools``: lazy exports only
    "adapter": "core",
    "linalg": "core",
    "errors": "core",
    "progress": "core",
    "device": "core",
    "distributed": "core",
    "kinds": "core",
    "formats": "core",
    "ops": "ops",
    "io": "io",
    "train": "train",
    "hub": "hub",
    "commands": "commands",
    "cli": "cli",
    "plot": "cli",  # matplotlib figures for spectrum --plot: drawn for the CLI only
    "plot_geometry": "cli",
}
# The layers each layer may import (its own always).
ALLOWED = {
    "core": {"core"},
    "ops": {"core"},
    "io": {"core"},
    "train": {"core", "io"},
    "hub": {"core", "ops", "io"},  # ops is pure: the model card shows ops.spectrum's spectra
    "commands": {"core", "ops", "io", "train", "hub"},
    "cli": {"core", "ops", "io", "train", "hub", "commands", "cli"},
}


def _top(module: str) -> str | None:
    """``loratools.ops.merge`` → ``ops``; ``loratools`` (or a name it defines, such as
    ``__version__``) → ``__init__``; modules of other packages → None."""
    parts = module.split(".")
    if parts[0] != "loratools":
        return None
    name = parts[1] if len(parts) > 1 else "__init__"
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists() else "__init__"


def own_imports(path: Path) -> set[str]:
    """The top-level loratools modules ``path`` imports, in-function imports included."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_top(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "loratools":  # from loratools import linalg
                found |= {_top(f"loratools.{alias.name}") for alias in node.names}
            else:
                found.add(_top(node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; loratools uses absolute imports")
    return {name for name in found if name is not None}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return LAYER_OF[rel.parts[0] if len(rel.parts) > 1 else rel.stem]


def test_every_module_has_a_layer() -> None:
    tops = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
    }
    assert tops - set(LAYER_OF) == set(), "add new top-level modules to LAYER_OF and docs/design.md"


def test_imports_between_packages_follow_the_layer_table() -> None:
    """No exceptions: ops opens no file (commands/ does, through io/)."""
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel, layer = path.relative_to(PACKAGE).as_posix(), _layer(path)
        for target in sorted({LAYER_OF[name] for name in own_imports(path)}):
            if target != layer and target not in ALLOWED[layer]:
                violations.append(f"{rel} ({layer}) imports {target}")
    assert violations == [], "see the layer table in docs/design.md"


def test_nothing_below_the_cli_reads_the_environment() -> None:
    # The CLI passes os.environ in (train's torchrun variables, extract's workers); huggingface_hub
    # reads its own HF_* variables.
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(path) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.attr] if isinstance(node, ast.Attribute) else []
            if isinstance(node, ast.ImportFrom) and node.module == "os":
                names = [alias.name for alias in node.names]
            if {"environ", "environb", "getenv", "getenvb"} & set(names):
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert readers == []


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, loratools, loratools.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_command_help_does_not_import_torch() -> None:
    """Every cli module loads without torch, so `loratools CMD --help` stays instant (torch: seconds)."""
    import subprocess
    import sys

    from loratools.cli.main import COMMANDS

    modules = sorted({module for module, _ in COMMANDS.values()})
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
