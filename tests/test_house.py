"""The house's rules, read from the code itself (issue 16): imports run downward between the
packages, no module takes another's private names, imports stand at the top (optional
dependencies aside), and no function in jaxlora/ runs past 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxlora"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "convert").glob("*.py")) + [ROOT / "train.py",
                                                                                      ROOT / "generate.py"]
MAX_LINES = 80
# Imported inside functions on purpose: heavy or optional dependencies, loaded only when used.
OPTIONAL = ("torch", "transformers", "peft", "matplotlib", "bitsandbytes")
# What each floor may import (besides itself and the floors under it); the ground floor imports nothing of ours.
FLOORS = {
    "train": {"infer", "weights", "parallel", "model", "text", "config", "errors", "demo"},
    "infer": {"weights", "parallel", "model", "text", "config", "errors", "demo"},
    "weights": {"parallel", "model", "text", "config", "errors"},
    "parallel": {"model", "config", "errors"},
    "model": {"config", "errors"},
    "text": {"errors"},
    "demo": set(), "config": set(), "errors": set(),
}


def package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def jaxlora_imports(tree: ast.AST) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, module, names) of every `from jaxlora... import` and `import jaxlora...`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxlora":
            found.append((node, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node, a.name, []) for a in node.names if a.name.split(".")[0] == "jaxlora"]
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path):
    here = package_of(path)
    if here == "__init__":
        return
    for node, module, names in jaxlora_imports(ast.parse(path.read_text())):
        parts = module.split(".")
        targets = [parts[1]] if len(parts) > 1 else names  # `from jaxlora import errors` names the room
        for there in targets:
            assert there == here or there in FLOORS[here], f"{path.relative_to(ROOT)}:{node.lineno} imports " \
                f"jaxlora.{there} from jaxlora.{here}: an arrow running up"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_and_imports_at_the_top(path):
    tree = ast.parse(path.read_text())
    for node, module, names in jaxlora_imports(tree):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports private {private} from {module}"
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    assert (module or "").split(".")[0] in OPTIONAL, \
                        f"{path.relative_to(ROOT)}:{node.lineno} imports {module} inside {fn.name}()"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_longer_than_a_screen(path):
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = fn.end_lineno - fn.lineno + 1
            assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}() has {lines} lines"
