"""Nothing a user wrote is lost (utils/outputs.py): no tool writes over one of its inputs,
however the path is spelled; every output is written atomically; a run's output is locked
for its life; an output that cannot be written is refused before any work."""
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, IMG_DB, ROOT, TINY_CONFIG, TXT_DB
from helpers import assert_one_line, end_of_process, entry
from scripts.repo import child_env
from utils.outputs import (OutputError, atomic_write, lock_dir, lock_output_file, refuse_unwritable, release_locks,
                           write_bytes, write_json, write_text)

REF_MODEL = os.path.join(FIXTURES, "ref_model.pt")
TXT_IDS = ["t0", "t1", "t2", "t3"]
IMG_IDS = ["I0", "I1"]


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    end_of_process()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def score_file(path):
    torch.save({"scores": torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]]), "txt_ids": TXT_IDS,
                "img_ids": IMG_IDS, "txt2img": {"t0": "I0", "t1": "I0", "t2": "I1", "t3": "I1"}}, path)
    return path


def metrics_inputs(folder):
    """Valid inputs of scripts/retrieval_metrics.py: without the check, each run below
    would succeed and leave the metrics JSON where the input was."""
    score_file(folder / "S.pt")
    score_file(folder / "other.pt")
    (folder / "groups.json").write_text(json.dumps([{"caption_0": "t0", "caption_1": "t2", "image_0": "I0",
                                                     "image_1": "I1"}]))
    return {"scores": ["S.pt"], "--compare": ["S.pt", "--compare", "other.pt"],
            "--groups": ["S.pt", "--groups", "groups.json"]}


def spelled(folder, name, spelling):
    """Another path to the file ``folder/name``, given relative to ``folder``."""
    if spelling == "same":
        return name
    if spelling == "absolute":
        return str(folder / name)
    if spelling == "dot-dot":
        (folder / "sub").mkdir(exist_ok=True)
        return os.path.join("sub", "..", name)
    link = folder / f"{spelling}-{name}.json"
    os.symlink(folder / name, link) if spelling == "symlink" else os.link(folder / name, link)
    return link.name


INPUT_OF = {"scores": "S.pt", "--compare": "other.pt", "--groups": "groups.json"}
SPELLINGS = ("same", "absolute", "dot-dot", "symlink", "hard link")


@pytest.mark.parametrize("flag,spelling", list(itertools.product(INPUT_OF, SPELLINGS)))
def test_metrics_never_write_over_an_input(tmp_path, flag, spelling):
    args = metrics_inputs(tmp_path)[flag]
    before = {name: digest(tmp_path / name) for name in INPUT_OF.values()}
    output = spelled(tmp_path, INPUT_OF[flag], spelling)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "retrieval_metrics.py"), *args,
                          "--output", str(output)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("retrieval_metrics.py: error: --output "), res.stderr
    assert f"the same file as {'the score file' if flag == 'scores' else flag} {INPUT_OF[flag]}" in res.stderr
    assert {name: digest(tmp_path / name) for name in INPUT_OF.values()} == before
    assert not res.stdout and not [n for n in os.listdir(tmp_path) if n.endswith(".lock")]


def test_metrics_run_writes_its_output_and_leaves_no_lock(tmp_path):
    args = metrics_inputs(tmp_path)["--groups"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "retrieval_metrics.py"), *args,
                          "--output", "out/m.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "m.json").read_text())["winoground"]["n"] == 1
    assert os.listdir(tmp_path / "out") == ["m.json"]


# ----------------------------------------------------------------------------- every tool

def inf_argv(tmp_path, **flags):
    args = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": REF_MODEL, "--model_config": TINY_CONFIG,
            "--output_dir": str(tmp_path / "out"), "--batch_size": "8", "--n_workers": "0"}
    args.update(flags)
    return [x for kv in args.items() for x in kv if x is not None]


def split_argv(**flags):
    args = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": REF_MODEL, "--model_config": TINY_CONFIG,
            **flags}
    return [x for kv in args.items() for x in kv]


def group_argv(tmp_path):
    return ["--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoints", REF_MODEL, "--model_config", TINY_CONFIG,
            "--groups", str(tmp_path / "groups.json")]


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(open(src, "rb").read())
    return dst


# (tool, the input that an output is, argv built from tmp_path with that input in place)
SAME_FILE_CASES = [
    ("inf_itm", "out/config.json",
     lambda t: inf_argv(t, **{"--train_config": str(_write(t / "out" / "config.json", "{}")), "--overwrite": None})),
    ("inf_itm", "out/score_matrix.pt",
     lambda t: inf_argv(t, **{"--checkpoint": str(_copy(REF_MODEL, t / "out" / "score_matrix.pt")),
                              "--overwrite": None})),
    ("inf_itm", "out/scores.json",
     lambda t: inf_argv(t, **{"--model_config": str(_copy(TINY_CONFIG, t / "out" / "scores.json")),
                              "--overwrite": None})),
    ("scripts.isd", "isd/isd.json",
     lambda t: split_argv() + ["--output", str(t / "isd"), "--annotations", str(_write(t / "isd" / "isd.json", "{}"))]),
    ("scripts.isd", "isd/isd.png",
     lambda t: split_argv(**{"--model_config": str(_copy(TINY_CONFIG, t / "isd" / "isd.png"))})
     + ["--output", str(t / "isd")]),
    ("scripts.visualize_attention", "v.json",
     lambda t: split_argv() + ["--txt_id", "x", "--vocab", str(_write(t / "v.json", "{}")), "--output",
                               str(t / "v.json")]),
    ("scripts.visualize_attention", "m.json",
     lambda t: split_argv(**{"--model_config": str(_copy(TINY_CONFIG, t / "m.json"))})
     + ["--txt_id", "x", "--output", str(t / "m.json")]),
    ("scripts.group_scores", "g.json",
     lambda t: group_argv(t)[:-2] + ["--groups", str(_write(t / "g.json", "[]")), "--output", str(t / "g.json")]),
    ("scripts.prepro_winoground", "o/winoground_groups.json",
     lambda t: ["--examples", str(_write(t / "o" / "winoground_groups.json", "{}")), "--vocab", str(t / "v.txt"),
                "--output", str(t / "o")]),
    ("scripts.prepro_itm", "o/itm_flickr30k_val.db/meta.json",
     lambda t: ["--annotation", str(_write(t / "o" / "itm_flickr30k_val.db" / "meta.json", '{"images": []}')),
                "--vocab", str(_write(t / "v.txt", "[UNK]\n")), "--dataset", "flickr30k", "--output", str(t / "o")]),
]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("tool,input_name,argv", SAME_FILE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SAME_FILE_CASES])
def test_no_tool_writes_over_its_inputs(tmp_path, monkeypatch, capsys, tool, input_name, argv):
    args = argv(tmp_path)
    before = digest(tmp_path / input_name)
    code, err = entry(tool, args, monkeypatch, capsys)
    assert_one_line(code, err, "--output", f"the same file as --", str(tmp_path / input_name))
    assert err.count("\n") == 1, err  # refused before any work: nothing logged
    assert digest(tmp_path / input_name) == before


def test_convert_imgdir_refuses_an_img_db_that_is_its_input(tmp_path, monkeypatch, capsys):
    """--img_dir where the conversion would put its LMDB (OUTPUT/<img_dir name>/feat_th0.2_max100_min10)."""
    src = tmp_path / "out" / "feat_th0.2_max100_min10" / "feat_th0.2_max100_min10"
    src.mkdir(parents=True)
    (src / "a.npz").write_bytes(b"user's features")
    code, err = entry("scripts.convert_imgdir", ["--img_dir", src, "--output", tmp_path / "out" / "sub" / ".."],
                      monkeypatch, capsys)
    assert_one_line(code, err, "the same file as --img_dir")
    assert (src / "a.npz").read_bytes() == b"user's features"


# ----------------------------------------------------------------------------- atomic writes

class Unserialisable:
    pass


def _fails_midway(exception):
    def write(f):
        f.write(b"partial" if "b" in f.mode else "partial")
        raise exception
    return write


FAILURES = {"serialiser raises": (TypeError("not serialisable"), TypeError),
            "full disk": (OSError(errno.ENOSPC, "No space left on device"), OutputError),
            "serialiser write failed": (RuntimeError("file write failed"), OutputError),
            "interrupted": (KeyboardInterrupt(), KeyboardInterrupt)}


@pytest.mark.parametrize("failure,binary,existing", list(itertools.product(FAILURES, (True, False), (True, False))))
def test_a_failed_write_leaves_the_previous_file_or_none(tmp_path, failure, binary, existing):
    path = tmp_path / "out.json"
    if existing:
        path.write_text("previous complete file")
    raised, expected = FAILURES[failure]
    with pytest.raises(expected) as caught:
        atomic_write(str(path), _fails_midway(raised), binary=binary)
    if expected is OutputError:
        kept = "the previous file there is intact" if existing else "nothing was written there"
        assert str(caught.value).startswith(f"could not write {path}: ") and str(caught.value).endswith(kept)
    assert os.listdir(tmp_path) == (["out.json"] if existing else [])
    if existing:
        assert path.read_text() == "previous complete file"


def test_json_that_cannot_be_serialised_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(str(path), {"a": 1}, indent=2)
    with pytest.raises(TypeError):
        write_json(str(path), {"a": 2, "b": Unserialisable()}, indent=2)
    assert path.read_text() == json.dumps({"a": 1}, indent=2)
    assert os.listdir(tmp_path) == ["m.json"]


def test_writers_write_what_they_are_given(tmp_path):
    write_text(str(tmp_path / "t.txt"), "caf\u00e9\n")
    write_bytes(str(tmp_path / "b.bin"), b"\x00\x01")
    write_json(str(tmp_path / "j.json"), {"k": [1, 2]}, indent=2)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "caf\u00e9\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "j.json").read_text() == json.dumps({"k": [1, 2]}, indent=2)


def test_a_symlinked_output_is_replaced_not_its_target(tmp_path):
    """Rename replaces the link: even a write the checks let through never reaches the file linked to."""
    (tmp_path / "target.txt").write_text("user's file")
    os.symlink(tmp_path / "target.txt", tmp_path / "link.txt")
    write_text(str(tmp_path / "link.txt"), "new")
    assert (tmp_path / "target.txt").read_text() == "user's file" and (tmp_path / "link.txt").read_text() == "new"


# ----------------------------------------------------------------------------- locks

HOLDER = """
import sys, time
from utils.outputs import lock_dir, lock_output_file
lock_dir(sys.argv[2], "--output_dir") if sys.argv[1] == "dir" else lock_output_file(sys.argv[2], "--output")
print("held", flush=True)
time.sleep(120)
"""


def _holder(kind, path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=child_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_second_claimant_is_refused_then_a_dead_holder_is_taken_over(tmp_path, caplog, kind):
    out = tmp_path / ("out" if kind == "dir" else "m.json")
    lock_path = tmp_path / ("out/.lock" if kind == "dir" else ".m.json.lock")
    (tmp_path / "out").mkdir()
    claim = (lambda: lock_dir(str(out), "--output_dir")) if kind == "dir" else \
        (lambda: lock_output_file(str(out), "--output"))
    holder = _holder(kind, out)
    try:
        with pytest.raises(OutputError, match=f"is in use by another run \\(pid {holder.pid} on .*\\) holding "
                                              f"{re.escape(str(lock_path))}; wait for it to end"):
            claim()
    finally:
        holder.kill()  # as a crash: the lock file stays, naming the dead process
        holder.wait()
    assert f"pid {holder.pid} on " in lock_path.read_text()
    with caplog.at_level(logging.INFO, logger="iais"):
        claim()
    taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert len(taken) == 1 and f"left by pid {holder.pid} on " in taken[0] and str(lock_path) in taken[0]
    assert lock_path.read_text().startswith(f"pid {os.getpid()} on ")
    release_locks()
    assert not lock_path.exists()


def test_two_inf_itm_runs_into_one_output_dir(tmp_path, monkeypatch, capsys):
    """While one evaluation holds --output_dir, a second is refused with the lock and the
    pid, and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder("dir", out)
    try:
        code, err = entry("inf_itm", inf_argv(tmp_path), monkeypatch, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line(code, err, f"--output_dir {out} is in use by another run (pid {holder.pid} on ",
                    f"holding {out / '.lock'}")
    assert os.listdir(out) == [".lock"]


def test_metrics_take_over_a_stale_lock(tmp_path, monkeypatch, capsys, caplog):
    metrics_inputs(tmp_path)
    (tmp_path / ".m.json.lock").write_text("pid 999999 on a-crashed-host\n")
    monkeypatch.chdir(tmp_path)
    import scripts.retrieval_metrics as metrics
    opts = metrics.build_parser().parse_args(["S.pt", "--output", "m.json"])
    with caplog.at_level(logging.INFO, logger="iais"):
        metrics.main(opts)
    assert any("left by pid 999999 on a-crashed-host" in r.getMessage() for r in caplog.records)
    assert "img_r1" in json.loads((tmp_path / "m.json").read_text())


# ----------------------------------------------------------------------------- unwritable outputs

def _unwritable(tmp_path, kind, monkeypatch):
    """An output path that cannot be written: a file where a folder goes (or the reverse),
    a path under a file, a path in a read-only folder."""
    (tmp_path / "file").write_text("a file")
    if kind == "wrong kind":
        (tmp_path / "folder").mkdir()
        return tmp_path / "file", tmp_path / "folder"
    if kind == "under a file":
        return tmp_path / "file" / "sub", tmp_path / "file" / "sub.json"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access  # root may write anywhere; the check must still see what another user would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro)
                        else real(p, mode, **kw))
    return ro / "out", ro / "m.json"


# (tool, whether its output is a folder, argv with the output)
TOOLS = {
    "inf_itm": (True, lambda t, o: inf_argv(t, **{"--output_dir": str(o)})),
    "scripts.retrieval_metrics": (False, lambda t, o: [str(score_file(t / "S.pt")), "--output", o]),
    "scripts.isd": (True, lambda t, o: split_argv() + ["--output", o]),
    "scripts.visualize_attention": (False, lambda t, o: split_argv() + ["--txt_id", "x", "--output", o]),
    "scripts.group_scores": (False, lambda t, o: group_argv(t) + ["--output", o]),
    "scripts.convert_imgdir": (True, lambda t, o: ["--img_dir", t, "--output", o]),
    "scripts.prepro_itm": (True, lambda t, o: ["--annotation", t / "file", "--vocab", t / "file", "--output", o]),
    "scripts.prepro_winoground": (True, lambda t, o: ["--examples", t / "e", "--vocab", t / "v", "--output", o]),
    "scripts.make_demo_data": (True, lambda t, o: ["--output", o]),
}
NEEDLES = {"wrong kind": ("exists and is not a folder", "is a folder; give the file"),
           "under a file": ("which is a file, not a folder",) * 2, "read-only": ("may not write in",) * 2}


@pytest.mark.parametrize("tool,kind", list(itertools.product(TOOLS, NEEDLES)))
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys, tool, kind):
    folder, build = TOOLS[tool]
    as_folder, as_file = _unwritable(tmp_path, kind, monkeypatch)
    output = as_folder if folder else as_file
    code, err = entry(tool, build(tmp_path, output), monkeypatch, capsys)
    assert_one_line(code, err, "--output", str(output), NEEDLES[kind][0 if folder else 1])
    assert err.count("\n") == 1, err  # nothing was loaded or evaluated first
    assert (tmp_path / "file").read_text() == "a file"
    if kind == "read-only":
        (tmp_path / "ro").chmod(0o755)


def test_inf_itm_output_dir_that_is_a_file_fails_at_once(tmp_path):
    """In a process of its own: the one line comes before the model or any DB is opened."""
    (tmp_path / "out").write_text("a file")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "inf_itm.py"), *inf_argv(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=child_env())
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == f"inf_itm.py: error: --output_dir {tmp_path / 'out'} exists and is not a folder; " \
                         f"choose another --output_dir\n"
    assert not res.stdout and (tmp_path / "out").read_text() == "a file"


def test_unwritable_checks_accept_a_new_path(tmp_path):
    refuse_unwritable("--output", str(tmp_path / "a" / "b"), folder=True)
    refuse_unwritable("--output", str(tmp_path / "a" / "m.json"), folder=False)
    assert os.listdir(tmp_path) == []
