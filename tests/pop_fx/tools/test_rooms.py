"""How pop_fx.tools' modules import each other, read from their source (nothing is imported or compiled)."""

import ast
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[3] / "pop_fx" / "tools"


def _module_name(path: Path) -> str:
    parts = path.relative_to(TOOLS.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names) of every import in the file, at any depth (function-level ones included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph():
    modules = {_module_name(p): p for p in TOOLS.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        out = set()
        for mod, names in _imports(path):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules] or [mod]
            out |= {t for t in targets if t in modules and t != name}
        edges[name] = out
    return edges


def test_no_import_circle_among_tools_modules():
    # A package's __init__ re-exporting its own modules is not an arrow a reader has to follow back.
    edges = {a: {b for b in outs if not b.startswith(a + ".")} for a, outs in _graph().items()}
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == [], f"import circles: {circles}"


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in TOOLS.rglob("*.py"):
        for mod, names in _imports(path):
            if mod.startswith(("pop_fx", "passes")):
                found += [f"{_module_name(path)}: from {mod} import {n}" for n in names if n.startswith("_")]
    assert found == []


def test_one_progress_logger_and_no_second_phases_module():
    # pop_fx/serving/phases.py holds the serving row codes; the tools' progress logger is tools/progress.py.
    assert not (TOOLS / "phases.py").exists() and (TOOLS / "progress.py").exists()
