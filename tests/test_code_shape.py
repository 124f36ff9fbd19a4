"""The code stays readable in small pieces: outside tests/, no function over 60 lines and no
module over 400 lines."""
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
