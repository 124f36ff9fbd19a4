"""Failure modes a user meets on the command line: each is one line, exit status 2,
nothing already written is lost."""
import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import FIXTURES, IMG_DB, TINY_CONFIG, TXT_DB
from helpers import ROOT, horovod_available, img_db_with_corrupt_value, launch_cmd, run, tiny_train_config
from utils.checkpoint import CheckpointError, atomic_save, load_checkpoint


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, res.stderr[-2000:]  # progress bars may precede it
    for needle in needles:
        assert needle in errors[0], errors[0]


def inf(out, **flags):
    args = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": os.path.join(FIXTURES, "ref_model.pt"),
            "--model_config": TINY_CONFIG, "--output_dir": str(out), "--batch_size": "8", "--n_workers": "0"}
    args.update(flags)
    return run(["inf_itm.py"] + [x for kv in args.items() for x in kv])


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"rank_output.weight": payload}, evil)
    res = inf(tmp_path / "out", **{"--checkpoint": str(evil)})
    assert_one_line_error(res, "needs pickled code", "evil.pt")
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "evil.pkl"))
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    data = open(os.path.join(FIXTURES, "ref_model.pt"), "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(inf(tmp_path / "out", **{"--checkpoint": str(tmp_path / "cut.pt")}),
                          "cut.pt is unreadable or truncated")


def test_model_config_that_does_not_fit(tmp_path):
    assert_one_line_error(inf(tmp_path / "out", **{"--model_config": os.path.join(ROOT, "config", "uniter-base.json")}),
                          "uniter.embeddings.word_embeddings.weight", "(1000, 64)", "(28996, 768)")


def test_missing_paths(tmp_path):
    assert_one_line_error(inf(tmp_path / "out", **{"--txt_db": str(tmp_path / "nope.db")}), "nope.db not found")
    assert_one_line_error(inf(tmp_path / "out", **{"--img_db": str(tmp_path / "noimg")}), "noimg not found")
    assert_one_line_error(inf(tmp_path / "out", **{"--model_config": str(tmp_path / "m.json")}), "m.json")


def test_txt_db_img_db_mismatch(tmp_path):
    other = tmp_path / "img"
    from data import ImgDbWriter
    with ImgDbWriter(str(other), 0.2, 100, 10, 36) as w:
        w.put("unrelated.npz", {"features": np.zeros((10, 2048)), "norm_bb": np.zeros((10, 6)),
                                "conf": np.ones(10), "soft_labels": np.zeros((10, 3))})
    assert_one_line_error(inf(tmp_path / "out", **{"--img_db": str(other)}),
                          "12 image(s)", "are not in", "flickr30k_0000000000")


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_corrupt_lmdb_value_through_a_worker(tmp_path, worker_type):
    img = img_db_with_corrupt_value(tmp_path / "img", "flickr30k_000000000007.npz")
    res = inf(tmp_path / "out", **{"--img_db": img, "--n_workers": "2", "--worker_type": worker_type})
    assert_one_line_error(res, "corrupt value for key 'flickr30k_000000000007.npz'")


def test_mini_batch_larger_than_the_split(tmp_path):
    """Reduced to the split's 12 images with one INFO line; 0 is still refused."""
    res = inf(tmp_path / "out", **{"--batch_size": "100"})
    assert res.returncode == 0, res.stderr[-2000:]
    said = [line for line in res.stderr.splitlines() if "is more than" in line]
    assert len(said) == 1 and "INFO" in said[0] and "--batch_size 100 is more than the 12 images" in said[0]
    assert said[0].endswith("using 12")
    assert_one_line_error(inf(tmp_path / "out0", **{"--batch_size": "0"}), "--batch_size")


def _train(tmp_path, *extra, **config):
    cfg = tiny_train_config(tmp_path / "c.json", **config)
    return run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(tmp_path / "o")] + list(extra))


def test_training_serves_a_validation_split_smaller_than_its_mini_batch(tmp_path):
    res = _train(tmp_path, inf_minibatch_size=64, num_train_steps=2)
    assert res.returncode == 0, res.stderr[-2000:]
    said = [line for line in res.stderr.splitlines() if "is more than" in line]
    assert len(said) == 1 and "inf_minibatch_size 64 is more than the 12 images" in said[0], res.stderr[-2000:]


def test_training_bad_input_catalogue(tmp_path):
    assert_one_line_error(_train(tmp_path, max_txt_len=2), "no caption left after filtering by max_txt_len")
    assert_one_line_error(_train(tmp_path, "--IAIS", "both"), "--IAIS")
    assert_one_line_error(_train(tmp_path, max_bb=500), "512 positions")
    assert_one_line_error(_train(tmp_path, train_txt_dbs=[str(tmp_path / "x.db")]), "x.db not found")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("previous results")
    assert_one_line_error(_train(tmp_path), "is not empty", "--resume")
    assert (tmp_path / "o" / "keep.txt").read_text() == "previous results"


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model_step_2.pt"
    atomic_save({"w": torch.ones(3)}, str(path))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on the device holding .*previous file there is intact"):
        atomic_save({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="no space left .*; nothing was written there$"):
        atomic_save({"w": torch.zeros(3)}, str(tmp_path / "model_step_4.pt"))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(str(path))["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model_step_2.pt"]


def test_serializer_write_failure_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save's own error on a full disk names no reason; the free space does."""
    import shutil
    from collections import namedtuple

    def failed_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failed_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda d: namedtuple("usage", "total used free")(100, 100, 0))
    with pytest.raises(CheckpointError, match=f"could not write .*: no space left on the device holding {tmp_path}"):
        atomic_save({"w": torch.zeros(3)}, str(tmp_path / "m.pt"))


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    """Image weights so large (finite, ~1e36) that the embedding overflows make every
    gradient non-finite: steps are skipped, the run stops after --max_skipped_steps, and no
    checkpoint with non-finite weights exists."""
    state = torch.load(os.path.join(FIXTURES, "ref_model.pt"), weights_only=True)
    state["uniter.img_embeddings.img_linear.weight"] = state["uniter.img_embeddings.img_linear.weight"] * 1e38
    assert torch.isfinite(state["uniter.img_embeddings.img_linear.weight"]).all()
    torch.save(state, tmp_path / "huge.pt")
    cfg = tiny_train_config(tmp_path / "c.json", checkpoint=str(tmp_path / "huge.pt"), num_train_steps=6, valid_steps=1)
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(tmp_path / "o"),
               "--max_skipped_steps", "3"])
    assert_one_line_error(res, "3 consecutive steps had non-finite gradients")
    ckpts = [name for name in os.listdir(tmp_path / "o" / "ckpt") if name.endswith(".pt")]
    for name in ckpts:
        state = load_checkpoint(str(tmp_path / "o" / "ckpt" / name))
        if name.startswith("model_step") or name == "best.pt":
            assert all(torch.isfinite(v).all() for v in state.values())
    assert "model_step_1.pt" in ckpts  # skipped steps leave the weights as they were


def _wait_for_ready_ranks(proc, ready_dir, n, timeout=120):
    """Process ids of the ``n`` ranks once each has written its ready file (see rank_probe.py)."""
    deadline = time.time() + timeout
    files = [os.path.join(ready_dir, f"rank{r}.pid") for r in range(n)]
    while time.time() < deadline and proc.poll() is None and not all(os.path.exists(f) for f in files):
        time.sleep(0.2)
    ready = [f for f in files if os.path.exists(f)]
    assert len(ready) == n, f"{len(ready)} of {n} ranks reached the training loop (launcher exit: {proc.poll()})"
    return [int(open(f).read()) for f in files]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return "rank_probe" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("launcher", ["torchrun", "horovodrun"])
def test_dead_rank_stops_the_others(tmp_path, launcher):
    if launcher == "horovodrun" and not horovod_available():
        pytest.skip("horovod is not installed (make test installs it)")
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=10000, valid_steps=10000)
    train = [os.path.join("tests", "rank_probe.py"), "train_itm_hard_negatives.py", "--config", cfg,
             "--output_dir", str(tmp_path / "o"), "--collective_timeout", "20"]
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    proc = subprocess.Popen(launch_cmd(train, launcher), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RANK_READY_DIR": str(ready_dir)})
    workers = []
    try:
        workers = _wait_for_ready_ranks(proc, str(ready_dir), 2)
        os.kill(workers[1], signal.SIGKILL)
        start = time.time()
        proc.wait(timeout=90)
        assert proc.returncode != 0
        assert time.time() - start < 90
        time.sleep(1)
        survivors = [p for p in workers if _alive(p)]
        assert not survivors, f"ranks outlived the run: {survivors}"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
