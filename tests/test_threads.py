"""utils/threads.py: the OpenMP wait policy is set before torch loads OpenMP, and a user's
own policy is never overridden."""
import ast
import itertools
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from scripts.repo import child_env
from utils.threads import DEFAULT_POLICY, POLICY_VARIABLES, apply_default_policy


@pytest.mark.parametrize("given", [c for n in range(len(POLICY_VARIABLES) + 1)
                                   for c in itertools.combinations(POLICY_VARIABLES, n)])
def test_the_default_applies_only_when_the_user_set_no_policy(given):
    environ = {"PATH": "/bin", **{name: "7" for name in given}}
    before = dict(environ)
    applied = apply_default_policy(environ)
    if given:
        assert applied == {} and environ == before
    else:
        assert applied == DEFAULT_POLICY and environ == {**before, **DEFAULT_POLICY}


def runnable_files():
    """Every file of the repository that runs as a program and may import torch."""
    skip = {os.path.join("scripts", "download_itm.py")}  # no torch: HTTP, archives, checksums
    for folder in ("", "scripts"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder or "."))):
            path = os.path.join(folder, name)
            if name.endswith(".py") and path not in skip and "__main__" in open(os.path.join(ROOT, path)).read():
                yield path


def first_import(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    node = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    return ast.unparse(node)


def test_every_program_sets_the_policy_before_anything_else():
    files = list(runnable_files())
    assert "train_itm_hard_negatives.py" in files and "inf_itm.py" in files and len(files) > 10
    wrong = {path: first_import(path) for path in files if first_import(path) != "import utils.threads"}
    assert not wrong, f"first import is not utils.threads: {wrong}"


def test_openmp_sees_the_default_and_the_users_own_policy():
    """In a fresh process, the variables are in place when torch has loaded libgomp; the
    user's own policy is left as it was."""
    probe = ("import os, runpy, sys; sys.argv = ['x', '--help']\n"
             "try:\n    runpy.run_path('inf_itm.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), "
             "'torch' in sys.modules)")
    env = {k: v for k, v in child_env().items() if k not in POLICY_VARIABLES}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split()[-3:] == [DEFAULT_POLICY["GOMP_SPINCOUNT"], "None", "True"], out.stderr
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True)
    assert out.stdout.split()[-3:] == ["None", "PASSIVE", "True"], out.stderr
