"""The package's layering (docs/architecture.md) as a test: no import runs up a layer, no module imports a
private name of another, and a function-local import of detkd says why it is not at the top of its file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "detkd"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("detkd.runtime",),  # process plumbing: dist, faults, checkpoint I/O, atomic writes, rank-0 printing
    ("detkd.config",),
    ("detkd.data", "detkd.models", "detkd.evaluation"),
    ("detkd.taps", "detkd.head_walk"),  # the one place that opens detectors (and its dense-head walk)
    ("detkd.distill",),  # the methods
    ("detkd.engine", "detkd.assemble"),  # the training / evaluation loop, and the set-up of a run
    ("detkd.cli", "detkd.bench", "detkd.bench_table", "detkd.demo", "detkd.export", "detkd.predict", "detkd.relations",
     "detkd.detection_grids", "detkd.prototype_export"),  # the commands
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str) -> int | None:
    if module == "detkd":
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
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


def test_every_module_has_a_layer():
    assert [module_name(f) for f in modules() if layer_of(module_name(f)) is None] == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_imports_point_down_and_name_nothing_private(path):
    me = module_name(path)
    source = path.read_text()
    lines = source.splitlines()
    problems = []
    for node, target, names, local in detkd_imports(ast.parse(source)):
        # ``from detkd.x import y`` may name the submodule detkd.x.y
        for t in [target] + [f"{target}.{n}" for n in names if layer_of(f"{target}.{n}") is not None]:
            if layer_of(t) > layer_of(me):
                problems.append(f"line {node.lineno}: imports {t}, a higher layer")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != me:
            problems.append(f"line {node.lineno}: imports private {target}.{', '.join(private)}")
        if local and not explained(lines, node.lineno):
                problems.append(f"line {node.lineno}: function-local import of {target} without a comment why")
    assert problems == []


def test_the_bottom_layer_imports_nothing_above_it():
    for path in (PACKAGE / "runtime").rglob("*.py"):
        for _, target, _, _ in detkd_imports(ast.parse(path.read_text())):
            assert target.startswith("detkd.runtime"), f"{path.name} imports {target}"
