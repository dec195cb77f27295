"""The package's layering (docs/architecture.md) as a test: the layers are the folders under ``detkd/``, no
import runs up a layer, no command imports another command, no module imports a private name of another,
a function-local import of detkd says why it is not at the top of its file, and a function over 80 lines
says in its docstring why it is one function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "detkd"

# The layer of a module is its first folder (or file) under detkd/; bottom to top. A module may import its
# own layer and the layers below it, except that the commands do not import each other.
LAYERS = [
    ("runtime", "errors"),  # process plumbing (dist, faults, checkpoint I/O, RNG state) and the error types
    ("config",),  # typed config dataclasses
    ("data", "models", "evaluation"),  # data sets, detectors, metrics
    ("taps",),  # the one place that opens detectors (and its dense-head walk)
    ("distill",),  # the methods
    ("engine",),  # the set-up of a run, the training step and loop, the evaluation loop
    ("bench", "viz"),  # the bench (spec, plan, run, report); drawing shared by the commands
    ("commands", "cli"),  # one module per command; cli.py parses the arguments and dispatches
]
COMMANDS = "commands"
MAX_LINES = 80
WHY_LONG = "Why one function:"  # the docstring sentence a longer function needs


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def top(module: str) -> str:
    """``detkd.engine.step`` -> ``engine``; ``detkd`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int | None:
    if module == "detkd":
        return 0
    for i, names in enumerate(LAYERS):
        if top(module) in names:
            return i
    return None


def detkd_imports(tree: ast.Module):
    """``(node, target module, imported names, function-local)`` for every import of detkd."""
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "detkd":
            yield node, node.module, [a.name for a in node.names], id(node) in local
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "detkd":
                    yield node, a.name, [], id(node) in local


def explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or on the line above the block of imports it belongs to."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_problems(me: str, source: str) -> list[str]:
    lines = source.splitlines()
    problems = []
    for node, target, names, local in detkd_imports(ast.parse(source)):
        # ``from detkd.x import y`` may name the submodule detkd.x.y
        for t in [target] + [f"{target}.{n}" for n in names if is_module(f"{target}.{n}")]:
            if layer_of(t) > layer_of(me):
                problems.append(f"line {node.lineno}: imports {t}, a higher layer")
            elif top(me) == COMMANDS and top(t) == COMMANDS and t != "detkd.commands" and me != "detkd.commands":
                problems.append(f"line {node.lineno}: imports {t}, another command (shared code goes below)")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != me:
            problems.append(f"line {node.lineno}: imports private {target}.{', '.join(private)}")
        if local and not explained(lines, node.lineno):
            problems.append(f"line {node.lineno}: function-local import of {target} without a comment why")
    return problems


def test_every_module_has_a_layer():
    assert [module_name(f) for f in modules() if layer_of(module_name(f)) is None] == []


def test_no_loose_modules_but_the_bottom_config_errors_and_entry_point():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "config.py", "errors.py"]


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_imports_point_down_and_name_nothing_private(path):
    assert import_problems(module_name(path), path.read_text()) == []


def test_the_check_catches_an_upward_a_sideways_and_an_unexplained_import():
    source = ("from detkd.engine.trainer import fit\n"
              "def f():\n    from detkd.runtime import dist\n")
    assert import_problems("detkd.distill.kd", source) == [
        "line 1: imports detkd.engine.trainer, a higher layer",
        "line 3: function-local import of detkd.runtime without a comment why",
    ]
    assert import_problems("detkd.commands.predict", "from detkd.commands.export import export_student\n") == [
        "line 1: imports detkd.commands.export, another command (shared code goes below)"]
    assert import_problems("detkd.commands.predict", "from detkd.commands import export\n") == [
        "line 1: imports detkd.commands.export, another command (shared code goes below)"]
    assert import_problems("detkd.cli", "from detkd.commands.export import export_student  # lazy: torch\n") == []
    assert import_problems("detkd.taps.head_walk", "from detkd.models.build import _private\n") == [
        "line 1: imports private detkd.models.build._private"]


def test_the_bottom_layer_imports_nothing_above_it():
    for path in (PACKAGE / "runtime").rglob("*.py"):
        for _, target, _, _ in detkd_imports(ast.parse(path.read_text())):
            assert target.startswith(("detkd.runtime", "detkd.errors")), f"{path.name} imports {target}"


def test_a_long_function_says_why_it_is_one():
    long = []
    for path in modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > MAX_LINES:
                if WHY_LONG not in (ast.get_docstring(fn) or ""):
                    long.append(f"{module_name(path)}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines")
    assert long == []
