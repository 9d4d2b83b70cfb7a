"""megamod's import graph has no cycle: between modules (every import, function-local ones included: a lazy import
hides a cycle, it does not remove it) and between its subpackages (megamod.training -> megamod.teacher_cache and
back would be one). And model kinds are named only by the family registry."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def modules(package_dir: str, package: str) -> dict:
    """Dotted module name -> file, for every .py under `package_dir` (a package's __init__ named as the package)."""
    out = {}
    for folder, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), package_dir)[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(folder, f)
    return out


def import_graph(package_dir: str, package: str) -> dict:
    """module -> the package's modules it imports (anywhere in its body)."""
    mods = modules(package_dir, package)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        here = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                t = known(t)
                if t is not None and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict, depth: int = 2) -> dict:
    """The module graph collapsed to subpackages (megamod.training.trainer -> megamod.training)."""
    top = lambda m: ".".join(m.split(".")[:depth])  # noqa: E731
    out = {}
    for m, targets in graph.items():
        out.setdefault(top(m), set()).update(top(t) for t in targets if top(t) != top(m))
    return out


def test_megamod_modules_import_no_cycle():
    graph = import_graph(os.path.join(ROOT, "megamod"), "megamod")
    assert len(graph) > 100  # the walk found the package
    assert cycles(graph) == []


def test_megamod_subpackages_import_no_cycle():
    graph = package_graph(import_graph(os.path.join(ROOT, "megamod"), "megamod"))
    assert {"megamod.training", "megamod.teacher_cache", "megamod.families", "megamod.models"} <= set(graph)
    assert cycles(graph) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_the_check_finds_a_cycle(tmp_path, lazy):
    """A new cycle fails the tests above: two modules of a package that import each other (one of them inside a
    function, which Python tolerates at run time), and two subpackages that do."""
    pkg = tmp_path / "pkg"
    for d in (pkg, pkg / "a", pkg / "b"):
        d.mkdir()
        (d / "__init__.py").write_text("")
    (pkg / "a" / "one.py").write_text("from pkg.b import two\n")
    body = "def f():\n    from pkg.a.one import X\n" if lazy else "from ..a import one\n"
    (pkg / "b" / "two.py").write_text(body)
    graph = import_graph(str(pkg), "pkg")
    assert cycles(graph) == [["pkg.a.one", "pkg.b.two"]]
    assert cycles(package_graph(graph)) == [["pkg.a", "pkg.b"]]
    (pkg / "b" / "two.py").write_text("import os\n")
    assert cycles(import_graph(str(pkg), "pkg")) == []


def test_model_kinds_are_named_only_by_the_registry():
    """Callers ask the family (megamod.families); only the registry spells a kind."""
    offenders = []
    for name, path in modules(os.path.join(ROOT, "megamod"), "megamod").items():
        if name.startswith("megamod.families"):
            continue
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if re.search(r"""["']llava["']""", line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{line_no}: {line.strip()}")
    assert offenders == []
