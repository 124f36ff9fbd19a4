"""The helper scripts, a package so that they import each other's shared modules as
``scripts.<name>``. Run one from the repository root with ``python -m scripts.<name>``, or
as ``python scripts/<name>.py`` with the repository on the path (``make`` puts it on the
path of .venv; the container sets PYTHONPATH=/src)."""
