"""The layers (STYLE.md "Layers"): imports run from the pytest side down to the kernel, never back up,
never in a circle; the mechanism (box/) runs without pytest, pluggy or filelock."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_nsbox

PACKAGE_DIR = Path(pytest_nsbox.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # what the builder puts on sys.path (box/builder.py)
BOX = "pytest_nsbox.box"
IMAGES = "pytest_nsbox.images"
BOX_MAY_IMPORT = ("pytest_nsbox.errors",)  # the one exception base of every layer
NOT_IN_BOX = ("pytest", "_pytest", "pluggy", "filelock")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}
BOX_MODULES = sorted(name for name in MODULES if name == BOX or name.startswith(BOX + "."))


def in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def imports_of(name: str) -> set[str]:
    """Every module *name* imports, anywhere in its body (module level, functions, TYPE_CHECKING):
    ``from X import y`` counts as X.y when that is a module of the package, else as X."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = str(node.module)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in MODULES else target)
    return found


def package_graph() -> dict[str, set[str]]:
    """Edges between the package's own modules."""
    return {name: {target for target in imports_of(name) if target in MODULES} for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph* as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


# Imports in a fresh interpreter with the repo first on sys.path. "-I -S" is how the builder starts
# it; "-I" keeps site-packages, where pytest is, so an import of pytest would succeed and show.
FRESH_IMPORT = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
module = importlib.import_module(sys.argv[2])
print(json.dumps({"file": module.__file__, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("flags", [("-I", "-S"), ("-I",)], ids=["as-the-builder", "with-site-packages"])
@pytest.mark.parametrize("name", BOX_MODULES)
def test_box_module_imports_without_pytest_or_filelock(name: str, flags: tuple[str, ...]) -> None:
    run = subprocess.run(
        [sys.executable, *flags, "-c", FRESH_IMPORT, str(REPO_ROOT), name], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    assert Path(loaded["file"]).resolve().is_relative_to(REPO_ROOT)
    assert [m for m in loaded["modules"] if m.partition(".")[0] in NOT_IN_BOX] == []


def test_the_walk_sees_relative_absolute_and_function_level_imports() -> None:
    assert len(BOX_MODULES) >= 12
    assert {"pytest_nsbox.box._linux", "pytest_nsbox.box.subids", "pytest_nsbox.box.mounts"} <= imports_of(
        "pytest_nsbox.box.config"
    )
    assert "pytest_nsbox.errors" in imports_of("pytest_nsbox.box.wire")  # from ..errors import NsboxError
    assert "pytest_nsbox.box.steps" in imports_of("pytest_nsbox")  # inside require_sandbox()
    assert "filelock" in imports_of("pytest_nsbox.images.cache")  # inside a function
    assert "pytest_nsbox.images.oci" in imports_of("pytest_nsbox.images")  # from . import oci, recipes


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    assert find_cycle(package_graph()) is None


def test_box_imports_nothing_above_it() -> None:
    wrong = {
        name: sorted(
            target
            for target in imports_of(name)
            if (in_layer(target, "pytest_nsbox") and not in_layer(target, BOX) and target not in BOX_MAY_IMPORT)
            or target.partition(".")[0] in NOT_IN_BOX
        )
        for name in BOX_MODULES
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_images_imports_only_box_and_errors() -> None:
    wrong = {
        name: sorted(
            target
            for target in imports_of(name) & set(MODULES)
            if not (in_layer(target, IMAGES) or in_layer(target, BOX) or target in BOX_MAY_IMPORT)
        )
        for name in MODULES
        if in_layer(name, IMAGES)
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}
