"""The code stays readable in small pieces: outside tests/, no function over 60 lines and no
module over 400 lines; packages import in layers, and no two modules import each other."""
import ast
import os

from conftest import ROOT

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
SKIP_DIRS = {"tests", "wheels", "demo", "bench_out", "node_modules", "__pycache__"}


def project_modules():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def long_functions(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                yield f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({n} lines)"


def test_the_walk_sees_the_project():
    found = {os.path.relpath(p, ROOT) for p in project_modules()}
    assert {"train_itm_hard_negatives.py", "inf_itm.py", "model/iais.py", "engine/train_step.py"} <= found
    assert not any(p.startswith("tests" + os.sep) for p in found)


def test_no_long_function():
    assert [f for path in project_modules() for f in long_functions(path)] == []


def test_no_long_module():
    sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p, encoding="utf-8")) for p in project_modules()}
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_limits_catch_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def f():\n{body}\n")
    assert [line.split(" ")[1] for line in long_functions(str(path))] == ["f"]


# which packages each layer may import: each only those below it (and itself)
LAYERS = {"utils": {"utils"}, "data": {"utils", "data"}, "model": {"utils", "model"},
          "engine": {"utils", "data", "model", "engine"},
          "scripts": {"utils", "data", "model", "engine", "scripts"}}
PACKAGES = set(LAYERS)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(path):
    """The repository modules ``path`` imports, at its top or inside a function."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t.split(".")[0] in PACKAGES)


def import_graph():
    """{module: the repository modules it imports} over every package and entry point."""
    modules = {module_name(p): p for p in project_modules()}
    return {name: {t for t in imported_modules(path) if t in modules and t != name} for name, path in modules.items()}


def layer_violations(graph):
    for name, targets in graph.items():
        layer = name.split(".")[0]
        allowed = LAYERS.get(layer, PACKAGES)  # entry points may import any package
        yield from (f"{name} imports {t}" for t in sorted(targets) if t.split(".")[0] not in allowed)


def import_cycles(graph):
    """Modules that import each other, directly or through others (strongly connected)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_packages_import_in_layers():
    assert list(layer_violations(import_graph())) == []


def test_no_two_modules_import_each_other():
    assert import_cycles(import_graph()) == []


def test_the_layer_checks_catch_their_cases():
    graph = {"utils.a": {"data.b"}, "data.b": {"model.c"}, "model.c": {"utils.a"}, "engine.d": {"data.b"},
             "scripts.e": {"scripts.f"}, "scripts.f": {"scripts.e"}}
    assert list(layer_violations(graph)) == ["utils.a imports data.b", "data.b imports model.c"]
    assert import_cycles(graph) == [["data.b", "model.c", "utils.a"], ["scripts.e", "scripts.f"]]
