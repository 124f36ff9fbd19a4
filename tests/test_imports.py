"""How the code finds its modules. The repository root is on the import path (the venv's
.pth file written by make, PYTHONPATH in the container, the current folder with ``python -m``);
a script run as ``python scripts/x.py`` puts its own repository first with one statement at
its top, so that a moved copy (or a venv naming another clone) imports its own modules. No
other module outside tests/ edits sys.path, and every script is a module of the scripts
package."""
import ast
import importlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# bench_original.py imports the original code's top-level packages (data, model, ...) from a
# checkout, in a process of its own: that tree has to come first on sys.path
ALLOWED = {os.path.join("scripts", "bench_original.py"): 1}
SCRIPTS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "scripts"))
                 if name.endswith(".py") and name != "__init__.py")


def project_modules():
    """Paths (relative to the root) of the Python files outside tests/, environments and
    hidden folders."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not (folder == ROOT and d == "tests")
                         and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg")))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


BOOTSTRAP = "sys.path.insert(0, dirname(dirname(realpath(__file__))))"


def sys_path_uses(path):
    """How often the module names sys.path (or imports path from sys), but for a script's
    bootstrap statement among its first (module-level) statements."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    tree.body = [node for k, node in enumerate(tree.body) if not (k < 5 and ast.unparse(node) == BOOTSTRAP)]
    return sum(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys"
               or isinstance(node, ast.ImportFrom) and node.module == "sys"
               and any(alias.name == "path" for alias in node.names)
               for node in ast.walk(tree))


def test_no_module_outside_the_tests_edits_sys_path():
    modules = list(project_modules())
    assert os.path.join("scripts", "isd.py") in modules and os.path.join("model", "__init__.py") in modules
    uses = {path: n for path in modules if (n := sys_path_uses(path))}
    assert uses == ALLOWED


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_as_a_module_of_the_scripts_package(name):
    importlib.import_module(f"scripts.{name}")


def test_scripts_run_as_modules_from_the_root_without_pythonpath():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("retrieval_metrics", "download_itm"):
        res = subprocess.run([sys.executable, "-m", f"scripts.{name}", "--help"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.startswith("usage: "), res.stderr[-2000:]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_puts_the_repository_on_the_venv_path(tmp_path):
    """The Makefile's step after the installation: a venv's Python imports the repository's
    packages from any folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / ".runtime").touch()  # what is installed does not matter here; make leaves it be
    res = subprocess.run(["make", f"VENV={venv}", f"{venv}/.repo-path"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([str(venv / "bin" / "python"), "-c", "import scripts.repo; print(scripts.repo.ROOT)"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0 and res.stdout.strip() == ROOT, res.stderr
    # a venv that names another checkout is put right at the next make
    pth = next(venv.glob("lib/python*/site-packages/iais-repository.pth"))
    pth.write_text(str(tmp_path / "elsewhere") + "\n")
    res = subprocess.run(["make", f"VENV={venv}", f"{venv}/.repo-path"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and pth.read_text().strip() == ROOT, res.stdout + res.stderr
