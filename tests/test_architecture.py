"""The package's shape: dependencies point one way, no import cycle, small modules.

Layers, lowest first (a module may import its own layer and the ones below):

0. core: masks, layers, model, bank, inference, objectives, config, data, ...
1. training, evaluation, NN detection
2. integrations (Avalanche)
3. experiment (build, run, resume, report; the backends)
4. the command line and the package's public API (``supsup/__init__.py``)

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "supsup"
#: a guard against a module growing into several concepts, not a budget to squeeze code into: a
#: module near it should be split where its concepts part, not compressed
MAX_LINES = 600
#: modules past MAX_LINES, each with why it is one concept (the warning list: a module joins it in
#: a reviewed change, never by squeezing another)
LONG_MODULES = {
    "supsup.model": "SupermaskModel: one class whose methods are its whole API (task bank, modes, superposition, "
                    "files); split, it would be mixins reading each other's private state again",
}

LAYERS = {
    "supsup.training": 1, "supsup.evaluation": 1, "supsup.detection": 1,
    "supsup.integrations": 2,
    "supsup.experiment": 3,
    "supsup.cli": 4, "supsup.__main__": 4,
}
ROOT_PACKAGE = "supsup"  # the public API re-exports from every layer: layer 4, but no prefix of the others


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == ROOT_PACKAGE:
        return 4
    best, rank = "", 0
    for prefix, r in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best, rank = prefix, r
    return rank


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import of a supsup module, wherever it is."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "supsup"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "supsup":
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            if submodules:
                out += [(f"{target}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                out.append((target, rest, node.lineno))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_dependencies_point_down_the_layers():
    wrong = [f"{m}:{line} imports {t} (layer {_layer(t)} above {_layer(m)})"
             for m, imports in GRAPH.items() for t, _, line in imports if _layer(t) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """No cycle among supsup's modules, counting imports inside functions (Tarjan's SCCs)."""
    edges = {m: sorted({t for t, _, _ in imports if t in MODULES and t != m}) for m, imports in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_name_is_imported_from_another_module():
    """Private modules (``supsup._kernels``) may be imported; private names from them may not."""
    wrong = [f"{m}:{line} imports {n} from {t}" for m, imports in GRAPH.items()
             for t, names, line in imports for n in names if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    if module in LONG_MODULES:  # the list stays true: a module that shrank leaves it
        assert lines > MAX_LINES, f"{module} has {lines} lines: take it off LONG_MODULES"
    else:
        assert lines <= MAX_LINES, (f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): "
                                    "split it where its concepts part, or list it in LONG_MODULES with why it is one")


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand (configs/ is mapped into supsup.configs): a new
    subpackage must be added there, or an installed supsup would lack it."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in MODULES.items() if p.name == "__init__.py"} | {"supsup.configs"}
    assert listed == found


def test_core_imports_without_avalanche_or_the_experiment_layer():
    """``import supsup`` (the Python API) loads neither Avalanche nor the experiment layer."""
    import subprocess
    import sys

    code = ("import sys, supsup; m = supsup.SupermaskModel; "
            "print([k for k in sys.modules if k.startswith(('avalanche', 'supsup.experiment', 'supsup.integrations'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
