"""The repository root, and the environment of the Python processes a script starts."""
import os
from os.path import abspath, dirname

ROOT = dirname(dirname(abspath(__file__)))


def child_env(**extra):
    """This process's environment with the repository root first on PYTHONPATH (and ``extra``
    set): a script started as ``python scripts/x.py`` imports the repository's packages
    whichever Python runs it and however this process found them."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), **extra}
