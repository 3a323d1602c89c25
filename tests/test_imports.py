"""No import circles inside npgpt2: data flows one way (files -> weights -> model -> cache ->
analysis), so a lower module never imports a higher one, not even inside a function. The imports are
read from the source (``ast``), at module level and inside functions alike; imports under
``if TYPE_CHECKING:`` (annotations only) do not count."""

import ast
import os

import npgpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(npgpt2.__file__)))


def modules() -> dict[str, str]:
    """npgpt2's module names -> their files."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "npgpt2")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(mods: dict[str, str]) -> dict[str, dict[str, bool]]:
    """module -> {npgpt2 module it imports: at module level?}"""
    edges = {m: {} for m in mods}
    for module, path in mods.items():
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]

        def targets(node):
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]

        def visit(node, top: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # for annotations only
                child_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for t in targets(child):
                        if t in mods and t != module:
                            edges[module][t] = edges[module].get(t, False) or child_top
                visit(child, child_top)

        visit(ast.parse(open(path, encoding="utf-8").read()), True)
    return edges


def cycles(edges: dict[str, dict[str, bool]], module_level_only: bool) -> list[list[str]]:
    """The import circles (strongly connected groups of more than one module), Tarjan's algorithm.
    The package itself (npgpt2/__init__.py, which gathers the public names) is left out."""
    graph = {m: [t for t, top in e.items() if (top or not module_level_only) and "." in t]
             for m, e in edges.items() if "." in m}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_reader_sees_real_imports():
    edges = imports(modules())
    assert edges["npgpt2.model"]["npgpt2.ops"] is True  # from . import fast, ops
    assert edges["npgpt2.hooks"]["npgpt2.cache"] is True
    assert "npgpt2.model" not in edges["npgpt2.generate"]  # under TYPE_CHECKING only
    assert edges["npgpt2.model"]["npgpt2.processing"] is False  # inside a method
    made_up = {"npgpt2.a": {"npgpt2.b": False}, "npgpt2.b": {"npgpt2.a": True}, "npgpt2.c": {}}
    assert cycles(made_up, module_level_only=False) == [["npgpt2.a", "npgpt2.b"]]
    assert cycles(made_up, module_level_only=True) == []


def test_no_import_circles_at_module_level():
    assert cycles(imports(modules()), module_level_only=True) == []


def test_no_import_circles_inside_functions_either():
    # a lower module reaching up from inside a function is the same circle, hidden: move the shared
    # piece down, or pass it in (as harvest/run.py hands its shard functions to cluster.py)
    assert cycles(imports(modules()), module_level_only=False) == []


def test_a_plain_import_reaches_the_subpackages_the_docs_use():
    """``import npgpt2`` then ``npgpt2.zoo.induction()`` (the README's example), in a fresh process
    outside the repository, without pandas imported until a subpackage that needs it is asked for."""
    import subprocess
    import sys
    import tempfile

    code = ("import sys, npgpt2; light = 'pandas' not in sys.modules; "
            "assert callable(npgpt2.zoo.induction) and npgpt2.zoo.InductionRecipe().n_layer == 2; "
            "assert callable(npgpt2.training.AdamW) and callable(npgpt2.analysis.logit_lens); "
            "assert callable(npgpt2.parity.judge) and callable(npgpt2.plot.imshow); print(light)")
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
    try:
        npgpt2.no_such_module
    except AttributeError as e:
        assert "no attribute 'no_such_module'" in str(e)
    else:
        raise AssertionError("npgpt2.no_such_module did not raise")
