"""The package's shape, kept by tests: imports run one way between the stages, rooms stay small, and no
private attribute of another library is touched outside a wrapper that says ``upstream:``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "actlightning"
# The typed contracts and helpers every stage may use: they import nothing above them.
BOTTOM = {"contracts", "errors", "humanize", "pretrained"}
STAGES = {"data", "model", "writer", "files", "read", "face"}
# What each part may import from this package (besides itself and the bottom).
ALLOWED = {
    "bottom": set(),
    "files": set(),
    "data": {"files"},
    "model": {"files"},
    "writer": {"files"},
    "read": {"files"},
    "face": {"data", "model", "writer", "files", "read"},
    # The package's entry points: ``python -m actlightning``, its lazy exports, the public reader and report.
    "top": STAGES,
}
MAX_MODULE_LINES = 300
MAX_CODEC_LINES = 450  # the Thrift codec's tables
MAX_FUNCTION_LINES = 50
# Underscored names that are documented public API (``os._exit``).
DOCUMENTED = {"_exit"}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    if len(parts) > 1 and parts[1] in BOTTOM:
        return "bottom"
    return "top"


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """``(module, line)`` of every import of this package in ``path``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("actlightning")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actlightning"):
            found.append((node.module, node.lineno))
            # ``from actlightning.files import pages`` imports a module of that package.
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_run_one_way():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        part = _part(module)
        for imported, line in _imports(path):
            target = _known(imported, modules)
            if target is None or target == "actlightning":
                continue
            other = _part(target)
            if other not in (part, "bottom") and other not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({part}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_the_face_but_the_entry_points():
    modules = _modules()
    for module, path in modules.items():
        if _part(module) in ("face", "top"):
            continue
        for imported, line in _imports(path):
            assert _part(_known(imported, modules) or "") != "face", f"{path}:{line}"


def test_module_imports_have_no_cycles():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = {_known(name, modules) for name, _ in _imports(path, top_level_only=True)}
        graph[module] = {t for t in targets if t is not None and t != module}
    # A package's __init__ is imported with each of its modules: only edges between modules count.
    graph = {m: {t for t in targets if modules[t].name != "__init__.py"} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_rooms_are_small(path):
    limit = MAX_CODEC_LINES if path.name == "thrift.py" else MAX_MODULE_LINES
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.name} has {lines} lines (at most {limit})"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring aside
            if body:
                length = body[-1].end_lineno - body[0].lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} has {length} lines"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in DOCUMENTED


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _private_uses(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of private names of other objects: ``obj._x`` (not ``self``/``cls``), ``from m
    import _x`` of another library, and ``getattr(obj, "_x")``."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not _is_self(node.value):
                uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("actlightning"):
            uses += [(node.lineno, a.name) for a in node.names if a.name.startswith("_") and a.name != "__future__"]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and _private(str(name.value)) and not _is_self(node.args[0]):
                uses.append((node.lineno, str(name.value)))
    return uses


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_attributes_of_other_libraries_only_behind_an_upstream_note(path):
    lines = path.read_text().splitlines()
    for line, name in _private_uses(path):
        # The wrapper's comment, within the few lines above the use, names what upstream lacks.
        context = "\n".join(lines[max(0, line - 5) : line])
        assert "upstream:" in context, f"{path.name}:{line} uses the private {name} without an upstream: note"
