"""Running the entry points the way a user does, and the fixture DBs as the original reads them."""
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import FIXTURES, IMG_DB, ROOT, TINY_CONFIG, TXT_DB, load_fixture
from scripts.repo import child_env
from utils.outputs import release_locks

PY = sys.executable
BIN = os.path.dirname(PY)


def tiny_train_config(path, **overrides):
    """A training config on the fixture split (train = val = test) with the tiny model."""
    config = {
        "train_txt_dbs": [TXT_DB], "train_img_dbs": [IMG_DB], "val_txt_db": TXT_DB, "val_img_db": IMG_DB,
        "test_txt_db": TXT_DB, "test_img_db": IMG_DB, "model_config": TINY_CONFIG,
        "checkpoint": os.path.join(FIXTURES, "ref_model.pt"), "train_batch_size": 2, "negative_size": 7,
        "hard_neg_size": 7, "inf_minibatch_size": 8, "learning_rate": 1e-4, "valid_steps": 2,
        "num_train_steps": 4, "optim": "adamw", "warmup_steps": 1, "grad_norm": 2.0, "n_workers": 0,
    }
    config.update(overrides)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it), so that
    launches running side by side never meet on torchrun's default 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(args, launcher=None, nproc=2):
    """The command line that runs ``args`` (a script and its flags) under ``launcher``."""
    if launcher == "torchrun":
        return [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] + args
    if launcher == "horovodrun":
        return [os.path.join(BIN, "horovodrun"), "-np", str(nproc), "--gloo", PY] + args
    return [PY] + args


def run(args, launcher=None, nproc=2, timeout=300, env=None):
    return subprocess.run(launch_cmd(args, launcher, nproc), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})))


def wait_until(proc, ready, timeout=120, every=0.05):
    """Return once ``ready()`` holds; fail if ``proc`` ends or ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended (exit status {proc.returncode}) before it got there"
        assert time.time() < deadline, f"the process did not get there in {timeout} s"
        time.sleep(every)


def have(tool):
    return shutil.which(tool, path=BIN) is not None


def horovod_available():
    return subprocess.run([PY, "-c", "import horovod.torch"], capture_output=True).returncode == 0


def img_db_with_corrupt_value(dst, key):
    """A copy of the fixture img_db whose value for ``key`` is not valid msgpack."""
    import lmdb
    shutil.copytree(IMG_DB, dst)
    env = lmdb.open(os.path.join(str(dst), "feat_th0.2_max100_min10"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), b"\xc1\xc1broken")
    env.close()
    return str(dst)


def copy_stopped_at(ref, out, later_steps):
    """A copy of the training folder ``ref`` as if the run had stopped before ``later_steps``
    (their checkpoints and training states removed): what --resume continues from."""
    shutil.copytree(ref, out)
    for step in later_steps:
        for name in (f"model_step_{step}.pt", f"train_state_{step}.pt"):
            os.remove(os.path.join(out, "ckpt", name))
    return out


def check_against_reference(img_db):
    """The features and boxes of the fixture img_db as the original loaded them."""
    ref_feats = load_fixture("ref_img_feats.pt")
    assert img_db.name2nbb == ref_feats["name2nbb"]
    for name, ref in ref_feats["feats"].items():
        feat, norm_bb = img_db[name]
        as_loaded = feat.float().numpy()
        assert list(as_loaded.shape) == ref["shape"]
        assert hashlib.sha256(as_loaded.tobytes()).hexdigest() == ref["features_sha256"]
        assert torch.equal(norm_bb, ref["norm_bb"].float())


def same_batch(a, b):
    """Whether two batches hold the same keys and values: tensors equal element by element
    and in dtype, everything else (their RowLengths) equal."""
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype if torch.is_tensor(a[k]) else a[k] == b[k]
               for k in a)


def clone_batch(batch):
    """A copy of a batch whose tensors own their memory (a loader may reuse the originals')."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def end_of_process():
    """What the end of an entry point's process does: its output locks are released."""
    release_locks()


@contextmanager
def run_state_released():
    """What an entry point run in this process holds, let go on leaving: the file handler
    a run adds for its log.txt, and the locks of its outputs."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        end_of_process()


def entry(module, argv, monkeypatch, capsys):
    """(exit status, stderr) of an entry point run in this process with ``argv``, under the
    same wrapper as on the command line."""
    from utils import cli  # imports the model: only the tests that run an entry point pay for it
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [f"{module.rsplit('.', 1)[-1]}.py"] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exited:
        cli.run(mod.main, mod.build_parser(), getattr(mod, "CONFIG_ONLY_KEYS", {}))
    end_of_process()
    return exited.value.code, capsys.readouterr().err


def assert_one_line(code, err, *needles):
    """Exit status 2, no traceback and one error line on stderr holding every
    needle; -> that line."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
