"""Where the serving code sits: ``pop_fx/ops`` holds the ``pop::`` ops and never imports ``pop_fx.serving``;
serving and the vLLM plugin import no private name of another module and nothing they leave unused."""

import ast
from pathlib import Path

import pop_fx

PKG = Path(pop_fx.__file__).parent


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.asname or a.name for a in node.names], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [a.asname or a.name.split(".")[0]], [a.name]


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (PKG / d).glob("*.py"))


def test_ops_never_import_serving():
    bad = [(p.name, mod) for p in _files("ops") for mod, _, _ in _imports(p) if mod.startswith("pop_fx.serving")]
    assert not bad, f"pop_fx/ops imports upward into pop_fx.serving: {bad}"


def test_no_ragged_module_is_left_in_ops_without_an_op():
    """A ragged module stays in ops/ only if it declares a ``pop::`` op (ragged_prefill does)."""
    for p in (PKG / "ops").glob("ragged_*.py"):
        assert 'custom_op("pop::' in p.read_text(), f"{p.name} defines no pop:: op: it belongs in pop_fx/serving"


def test_no_private_name_crosses_a_module():
    files = _files("serving", "integrations") + sorted((PKG / "ops").glob("ragged_*.py"))
    bad = [(p.name, mod, n) for p in files for mod, _, names in _imports(p)
           if mod.startswith("pop_fx") for n in names if n.startswith("_")]
    assert not bad, f"private names imported across modules: {bad}"


def test_no_unused_import():
    unused = []
    for p in _files("serving", "integrations"):
        tree = ast.parse(p.read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        exported = set()
        for node in tree.body:  # names re-exported through __all__ count as used
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                exported = {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for a in node.names:
                    name = a.asname or a.name
                    if name not in used and name not in exported:
                        unused.append((p.name, name))
    assert not unused, f"unused imports: {unused}"


def test_serving_probes_the_activation_with_the_references_function():
    from pop_fx import reference
    from pop_fx.serving import ffn

    assert ffn.activation_code is reference.activation_code
