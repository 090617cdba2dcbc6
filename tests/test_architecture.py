"""The engine's module map holds (docs/architecture.md): no import cycle, function-local imports included, and no
code outside a module imports its `_private` names."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "lib" / "radregion"


def _module(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(module imported, names imported from it) for every import in the file, wherever it stands."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_the_engine_has_no_import_cycle():
    modules = {_module(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported, names in _imports(path):
            targets |= {f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules}
            targets |= {imported} if imported in modules and imported != "radregion" else set()
        graph[name] = targets - {name}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_imported_from_the_engine():
    reach_ins = []
    for folder in ("lib", "apps", "bench", "slicer_module"):
        for path in (REPO / folder).rglob("*.py"):
            for imported, names in _imports(path):
                if imported.startswith("radregion"):
                    reach_ins += [
                        f"{path.relative_to(REPO)}: {imported}.{n}"
                        for n in names
                        if n.startswith("_") and not n.startswith("__")
                    ]
    assert not reach_ins, reach_ins
