"""The Dockerfile, read as text (no Docker engine needed): what it copies exists and is not
ignored, what it runs is in the repository, its base image is a build argument."""
import fnmatch
import os
import re
import shlex

import pytest

from conftest import ROOT


def instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def copies():
    """(sources, destination) of every COPY/ADD from the build context."""
    result = []
    for name, args in instructions():
        if name in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in shlex.split(args)), "copies from another stage"
            result.append((words[:-1], words[-1]))
    return result


def ignore_patterns():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"
    return [os.path.normpath(p) for p in patterns]


def ignored(path, patterns):
    """Whether Docker leaves ``path`` (relative to the context) out: a pattern matches it or a
    folder above it; a leading ``**/`` matches any depth, the root included."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    variants = [v for p in patterns for v in ([p, p[3:]] if p.startswith("**/") else [p])]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in variants)


def test_base_image_is_a_build_argument_with_a_current_default():
    steps = instructions()
    arg = next(args for name, args in steps if name == "ARG")
    key, default = arg.split("=", 1)
    assert re.fullmatch(r"2[5-9]\.(0[1-9]|1[0-2])-py3", default), default
    first_from = next(args for name, args in steps if name == "FROM")
    assert first_from == f"nvcr.io/nvidia/pytorch:${{{key}}}"
    assert [name for name, _ in steps].index("ARG") < [name for name, _ in steps].index("FROM")


def test_every_copied_file_exists_and_is_in_the_build_context():
    patterns = ignore_patterns()
    assert copies(), "the Dockerfile copies nothing"
    for sources, _ in copies():
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source
            if source != ".":
                assert not ignored(os.path.normpath(source), patterns), source


def in_image():
    """Image path -> repository path of each copied file, and the folders they were copied into."""
    files, folders = {}, {}
    for sources, dest in copies():
        for source in sources:
            if source == ".":
                folders[dest.rstrip("/")] = ""
            else:
                files[os.path.join(dest, os.path.basename(source))] = source
                folders.setdefault(dest.rstrip("/"), None)
    return files, folders


def test_every_file_a_step_runs_or_reads_is_in_the_repository():
    """A path that a RUN step names inside a folder the Dockerfile copied into is a copied
    repository file (or one the step writes itself)."""
    files, folders = in_image()
    runs = " ".join(args for name, args in instructions() if name == "RUN")
    written = set(re.findall(r">\s*(/\S+)", runs))
    checked = 0
    for path in set(re.findall(r"(?<![\w.])(/[\w./-]+)", runs)) - written:
        folder = next((f for f in folders if path.startswith(f + "/")), None)
        if folder is None:
            continue  # a path of the base image (/var/run/sshd, /var/lib/apt/lists)
        if folders[folder] is None:  # a folder of single files
            assert path in files, f"{path} is not copied into the image"
            source = files[path]
        else:  # the repository copied whole
            source = os.path.relpath(path, folder)
        assert os.path.isfile(os.path.join(ROOT, source)), f"{path}: {source} is not in the repository"
        checked += 1
    assert checked >= 2
    assert "bash /tmp/setup/install_horovod.sh python" in runs


def test_image_installs_the_lock_ssh_and_the_build_tools():
    runs = " ".join(args for name, args in instructions() if name == "RUN")
    apt = re.search(r"apt-get install ([^&]+)", runs).group(1).split()
    assert {"cmake", "g++", "openssh-client", "openssh-server"} <= set(apt)
    assert "grep -v '^torch[=<>~ ]' /tmp/setup/requirements.lock" in runs
    assert "pip install --no-cache-dir -r /tmp/setup/requirements-without-torch.txt" in runs
    # horovod builds against the locked packages: the lock is installed before it
    assert runs.index("requirements-without-torch.txt") < runs.index("install_horovod.sh")



def test_the_scripts_find_the_repository_in_the_image():
    """python scripts/x.py imports data, model, utils and scripts from /src, where the code is
    copied (or mounted over by launch_container.sh), ahead of any PYTHONPATH of the base image."""
    envs = [args for name, args in instructions() if name == "ENV"]
    value = next(args.split("=", 1)[1] for args in envs if args.startswith("PYTHONPATH="))
    assert re.match(r"/src(:|\$|$)", value), value
    _, folders = in_image()
    assert folders.get("/src") == ""  # the repository copied whole

@pytest.mark.parametrize("path, left_out", [
    (".venv/bin/python", True), ("demo/txt_db/itm_demo_test.db/data.mdb", True), ("output/ckpt/model_step_1.pt", True),
    ("bench_out/bench.json", True), ("model/__pycache__/model.cpython-311.pyc", True), (".git/HEAD", True),
    ("requirements.lock", False), ("scripts/install_horovod.sh", False), ("train_itm_hard_negatives.py", False),
    ("tests/fixtures/original/ref_model.pt", False), ("config/uniter-base.json", False),
])
def test_dockerignore_keeps_the_code_and_leaves_out_environments_and_outputs(path, left_out):
    assert ignored(path, ignore_patterns()) == left_out
