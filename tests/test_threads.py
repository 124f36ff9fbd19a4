"""utils/threads.py: the thread count is set before torch loads OpenMP, and a user's own
setting is never overridden."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from scripts.repo import child_env
from utils.threads import THREADS_VARIABLE, apply_default_policy, available_cores, default_threads


@pytest.mark.parametrize("cores", [1, 2, 3, 16, 128])
def test_one_core_is_left_free_unless_the_user_chose(cores):
    environ = {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert apply_default_policy(environ, cores) == {THREADS_VARIABLE: str(max(1, cores - 1))}
    assert environ == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", THREADS_VARIABLE: str(max(1, cores - 1))}
    for own in ("1", "4", "8"):
        environ = {THREADS_VARIABLE: own}
        assert apply_default_policy(environ, cores) == {} and environ == {THREADS_VARIABLE: own}


def test_the_cores_are_those_this_process_may_use():
    assert available_cores() == len(os.sched_getaffinity(0)) and default_threads(available_cores()) >= 1


def runnable_files():
    """Every file of the repository that runs as a program and may import torch."""
    skip = {os.path.join("scripts", "download_itm.py")}  # no torch: HTTP, archives, checksums
    for folder in ("", "scripts"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder or "."))):
            path = os.path.join(folder, name)
            if name.endswith(".py") and path not in skip and "__main__" in open(os.path.join(ROOT, path)).read():
                yield path


# what a script may import before utils.threads: the standard-library names with which it puts its
# own repository first on the path (neither loads OpenMP)
BOOTSTRAP_IMPORTS = ("import sys", "from os.path import dirname, realpath")


def first_import(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    imports = (ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    return next(i for i in imports if i not in BOOTSTRAP_IMPORTS)


def test_every_program_sets_the_policy_before_anything_else():
    files = list(runnable_files())
    assert "train_itm_hard_negatives.py" in files and "inf_itm.py" in files and len(files) > 10
    wrong = {path: first_import(path) for path in files if first_import(path) != "import utils.threads"}
    assert not wrong, f"first import is not utils.threads: {wrong}"


def test_torch_computes_with_the_policys_threads():
    """In a fresh process started by an entry point, torch uses the default thread count,
    or the user's own."""
    probe = ("import runpy, sys; sys.argv = ['x', '--help']\n"
             "try:\n    runpy.run_path('inf_itm.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import torch; print('threads', torch.get_num_threads())")
    env = {k: v for k, v in child_env().items() if k != THREADS_VARIABLE}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["threads", str(default_threads(available_cores()))], out.stderr
    own = str(available_cores())  # all of them: the user's choice, unlike the default (torch caps it at the cores)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, THREADS_VARIABLE: own},
                         capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["threads", own], out.stderr
