"""The module map holds (docs/architecture.md): the engine has no import cycle, function-local imports included; no
code outside a module imports its `_private` names; the test/bench harness stays outside the product; benchmarks
import only installed packages."""

import ast
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "lib" / "radregion"
HARNESS = REPO / "lib" / "radregion_harness"
TESTS = REPO / "tests"


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


def _top(module: str) -> str:
    return module.split(".")[0]


def _test_code() -> set:
    """Top-level names only tests/ provides: its modules and packages (`conftest`, `fixtures`, `dicom_factory`...)."""
    return {p.stem for p in TESTS.glob("*.py")} | {p.name for p in TESTS.iterdir() if (p / "__init__.py").is_file()}


def test_the_harness_stays_outside_the_product():
    """radregion_harness launches the server and Orthanc as processes for tests and benches: no engine, server or
    Slicer code imports it, and it imports nothing of theirs (nor of the tests)."""
    users = [
        f"{path.relative_to(REPO)}: {imported}"
        for folder in (ENGINE, REPO / "apps", REPO / "slicer_module")
        for path in folder.rglob("*.py")
        for imported, _ in _imports(path)
        if _top(imported) == "radregion_harness"
    ]
    assert not users, users
    product = {"radregion", "radregion_model", "lib", "RadRegionLib", "monailabel"} | _test_code()
    reach_ins = [
        f"{path.relative_to(REPO)}: {imported}"
        for path in HARNESS.rglob("*.py")
        for imported, _ in _imports(path)
        if _top(imported) in product
    ]
    assert not reach_ins, reach_ins


def test_benchmarks_import_only_installed_packages():
    """bench/*.py imports no test code and no app code (`lib` is the server app's package), every module it imports
    is installed or a script beside it (python puts a script's folder first), and it edits neither sys.path nor
    PYTHONPATH."""
    scripts = sorted((REPO / "bench").glob("*.py"))
    problems = []
    for path in scripts:
        name = path.relative_to(REPO)
        for imported, _ in _imports(path):
            if _top(imported) in {p.stem for p in scripts}:
                continue
            if _top(imported) in _test_code() | {"lib"} or find_spec(_top(imported)) is None:
                problems.append(f"{name}: imports {imported}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                problems.append(f"{name}:{node.lineno}: sys.path")
            elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                problems.append(f"{name}:{node.lineno}: PYTHONPATH")
    assert not problems, problems
