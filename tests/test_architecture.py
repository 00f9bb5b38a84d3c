"""The package's layer rule (ARCHITECTURE.md), checked on the source: imports inside kt_ops only point
down or sideways, no private name is imported across a module boundary, no modules import each other
(lazy imports included), no module is over 500 lines and no function over 80."""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kt_ops"

# Lowest first; a module may import its own layer and the ones below it.
LAYERS = (
    ("kt_ops._C", "kt_ops.reference"),
    ("kt_ops.core",),
    ("kt_ops.ops",),
    ("kt_ops.function", "kt_ops.layer"),
    ("kt_ops.weights",),
    # the kt-kernel-compatible wrappers, and kt-kernel's import paths re-exporting them
    ("kt_ops.wrappers", "kt_ops.experts", "kt_ops.experts_base", "kt_ops.experts_sft", "kt_ops.utils"),
    (
        "kt_ops.serving",
        "kt_ops.integration",
        "kt_ops.plan",
        "kt_ops.cli",
        "kt_ops.convert_weights",
        "kt_ops.convert_moe_lora",
        # kt-kernel 0.7's SFT package (kt_kernel.sft) over the wrappers
        "kt_ops.sft",
    ),
    ("kt_ops",),
)
# kt-kernel's (and the specification's) name for the wrappers' shared base class.
PRIVATE_NAMES_BY_CONTRACT = {"_C", "_MoEBase"}


def layer_of(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (level, prefix)
    assert best is not None, (
        f"{module} is in no layer of tests/test_architecture.py: add it there and to ARCHITECTURE.md"
    )
    return best[0]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    if dotted == "kt_ops._C":  # the compiled extension, whether built yet or not
        return True
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def imports(path: pathlib.Path):
    """(imported module, imported names) for every import in the file, lazy ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{target}.{n}" for n in names if is_module(f"{target}.{n}")]
            attributes = tuple(n for n in names if f"{target}.{n}" not in submodules)
            if attributes:
                yield target, attributes
            for sub in submodules:
                yield sub, ()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_placed_in_a_layer():
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down_and_names_stay_public(path):
    source = module_name(path)
    for target, names in imports(path):
        if not (target == "kt_ops" or target.startswith("kt_ops.")) or target == source:
            continue
        assert layer_of(target) <= layer_of(source), (
            f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)}): an upward import"
        )
        private = [n for n in names if n.startswith("_") and n not in PRIVATE_NAMES_BY_CONTRACT]
        assert not private, f"{source} imports private names {private} from {target}"


def test_no_import_cycles():
    graph = defaultdict(set)
    for path in SOURCES:
        source = module_name(path)
        for target, _ in imports(path):
            if (target == "kt_ops" or target.startswith("kt_ops.")) and target != source:
                graph[source].add(target)
    state = {}  # module -> "visiting" | "done"

    def visit(module, trail):
        if state.get(module) == "visiting":
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(module) :] + [module]))
        if state.get(module) == "done":
            return
        state[module] = "visiting"
        for target in sorted(graph[module]):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has {len(text.splitlines())} lines: split it"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {length} lines: split it"
