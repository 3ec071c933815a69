"""The package's shape: its import graph (lazy imports inside functions included) has no cycle,
no module imports another's private name, the subpackages hold what their names say, and the
public names users have are where they were."""

import ast
from pathlib import Path

import pytest

import fa_triton

ROOT = Path(fa_triton.__file__).parent
KERNELS = ROOT.parent / "kernels"  # installed as fa_triton.kernels


def _modules() -> dict[str, Path]:
    """{module name: file} of fa_triton and fa_triton.kernels."""
    found = {}
    for base, package in ((ROOT, "fa_triton"), (KERNELS, "fa_triton.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """[(imported module, [names imported from it])] of a module, every import statement in it."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.startswith("fa_triton")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fa_triton"):
                continue
            names = [alias.name for alias in node.names]
            # `from package import submodule` imports the submodule.
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            out += [(sub, []) for sub in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in modules]))
    return out


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    modules, graph = _graph()
    edges = {name: {target for target, _ in imports if target in modules and target != name}
             for name, imports in graph.items()}
    # A package's __init__ importing its own children is the package assembling itself, not a
    # dependency of the children on it: drop the edges from a module to a package above it.
    for name, targets in edges.items():
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    state, cycle = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle.append(trail + [node, target])
            elif target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycle, cycle[0]
    assert len(modules) > 30


def test_no_module_imports_another_modules_private_name():
    modules, graph = _graph()
    private = [(name, target, n) for name, imports in graph.items() for target, names in imports
               for n in names if n.startswith("_") and not n.endswith("__") and target != name]
    assert not private, private


@pytest.mark.parametrize("package, holds", [
    ("rules", {"methods", "philox", "activations"}),
    ("ops", {"autograd", "library", "functional", "validation", "conv", "dfa", "sequential", "backends"}),
    ("ops.backends", {"registry", "reference", "triton", "auto"}),
    ("layers", {"linear", "conv", "state", "dfa_network", "dfa_model", "sequential"}),
    ("experiments", {"cli", "config", "runner", "training", "datasets", "report", "files", "reproduce", "published",
                     "akrout", "mnist"}),
])
def test_the_tree_shows_the_architecture(package, holds):
    folder = ROOT.joinpath(*package.split("."))
    assert {p.stem for p in folder.iterdir() if p.suffix == ".py" and p.stem != "__init__"} | {
        p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == holds


def test_public_names_are_kept():
    for name in ("FALinear", "FAConv2d", "fa_linear", "reference", "convert", "DFANetwork", "DFAModel", "METHODS",
                 "ACTIVATIONS", "BACKENDS", "load_linear_state_dict"):
        assert hasattr(fa_triton, name), name
    # Modules users were shown: fa_triton.models, .metrics and .mnist, loaded on first use.
    assert callable(fa_triton.models.lenet) and callable(fa_triton.metrics.weight_alignment)
    assert callable(fa_triton.mnist.train)
    with pytest.warns(DeprecationWarning, match="fa_triton.rules.methods"):
        import importlib
        import sys
        sys.modules.pop("fa_triton.methods", None)
        old = importlib.import_module("fa_triton.methods")
    assert old.philox_uniform is fa_triton.rules.philox.philox_uniform
