"""SIGINT and SIGTERM during training: a checkpoint at the step the run stops at, the
command that resumes it, and a resumed run that ends bit-identical to an uninterrupted one."""
import json
import os
import re
import shlex
import signal
import subprocess
import time

import pytest
import torch

from helpers import PY, ROOT, launch_cmd, run, tiny_train_config, wait_until
from scripts.repo import child_env
from utils.curves import read_metrics

STEPS, VALID = 12, 5
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+): checkpoint (\S+); resume with: (.+)")


def _args(tmp_path):
    # random initialisation: the resumed run must not announce it
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=STEPS, valid_steps=VALID, dropout=0.1,
                            learning_rate=1e-3, checkpoint=None)
    return ["train_itm_hard_negatives.py", "--config", cfg, "--IAIS", "singular"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out"
    res = run(_args(tmp) + ["--output_dir", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starts from random initialisation" in res.stderr
    return out


def _logged(out, pattern):
    path = out / "log" / "metrics.jsonl"
    return path.exists() and re.search(pattern, path.read_text()) is not None


def _start(args, out, logs):
    err = open(logs / "stderr.txt", "w")
    return subprocess.Popen(launch_cmd(args + ["--output_dir", str(out)]), cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _wait_for(proc, out, pattern, timeout=120):
    wait_until(proc, lambda: _logged(out, pattern), timeout, every=0.005)


def _same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _stopped_line(tmp_path):
    lines = [m for m in map(STOPPED.search, (tmp_path / "stderr.txt").read_text().splitlines()) if m]
    assert len(lines) == 1, (tmp_path / "stderr.txt").read_text()[-3000:]
    return lines[0]


def _check_resumes_identically(tmp_path, reference, out, stopped):
    command = shlex.split(stopped.group(4))
    assert command[0] == PY and command[-1] == "--resume"
    res = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out}/ckpt/train_state_{stopped.group(2)}.pt" in res.stderr
    assert "random initialisation" not in res.stderr
    _same_weights(reference / "ckpt" / f"model_step_{STEPS}.pt", out / "ckpt" / f"model_step_{STEPS}.pt")
    _same_weights(reference / "ckpt" / "best.pt", out / "ckpt" / "best.pt")
    for name in ("ckpt/best.json", "results_test/best.json", f"results_test/results_{STEPS}.json"):
        assert json.loads((reference / name).read_text()) == json.loads((out / name).read_text()), name
    assert read_metrics(reference / "log" / "metrics.jsonl")["loss_step"] == \
        read_metrics(out / "log" / "metrics.jsonl")["loss_step"]


@pytest.mark.parametrize("sig,after,status,loading", [
    # after the first step; as a terminal's Ctrl-C, to every process of the run (its loader processes too)
    (signal.SIGINT, r'"step": 1, "name": "loss_step"', 130, ["--n_workers", "2", "--worker_type", "process"]),
    (signal.SIGTERM, rf'"step": {VALID}, "name": "loss_step"', 143, []),  # the step that validates
])
def test_a_signal_stops_with_a_checkpoint_and_the_run_resumes(tmp_path, reference, sig, after, status, loading):
    args, out = _args(tmp_path) + loading, tmp_path / "out"
    proc = _start(args, out, tmp_path)
    _wait_for(proc, out, after)
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=120) == status
    stopped = _stopped_line(tmp_path)
    step = int(stopped.group(2))
    assert stopped.group(1) == sig.name and step < STEPS
    assert stopped.group(3) == str(out / "ckpt" / f"model_step_{step}.pt")
    assert sorted(os.listdir(out / "ckpt"))[-1] == f"train_state_{step}.pt"  # the last one written
    if step == VALID:  # a validation in progress is finished before the checkpoint of its step
        assert _logged(out, rf'"step": {VALID}, "name": "valid/recall_mean"')
    _check_resumes_identically(tmp_path, reference, out, stopped)


def test_a_second_signal_stops_at_once(tmp_path):
    args, out = _args(tmp_path), tmp_path / "out"
    proc = _start(args, out, tmp_path)
    _wait_for(proc, out, r'"step": 1, "name": "loss_step"')
    proc.send_signal(signal.SIGSTOP)  # both arrive together: SIGINT is handled first, then SIGTERM
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=120) == 143
    err = (tmp_path / "stderr.txt").read_text()
    assert "second signal (SIGTERM): stopping at once, without a checkpoint" in err
    assert not STOPPED.search(err)
    assert not [f for f in os.listdir(out / "ckpt") if f.endswith(".pt")]


def _worker_of_rank(launcher_pid, rank, timeout=120):
    """The pid of the torchrun worker with ``rank``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
                children = [int(p) for p in f.read().split()]
            for pid in children:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return pid
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def test_every_rank_stops_at_the_same_step(tmp_path):
    """A signal that reaches one rank only stops both at the same step, with one checkpoint."""
    args, out = _args(tmp_path), tmp_path / "out"
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(launch_cmd(args + ["--output_dir", str(out)], "torchrun"), cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        worker = _worker_of_rank(proc.pid, 1)
        _wait_for(proc, out, r'"step": 1, "name": "loss_step"', timeout=240)
        os.kill(worker, signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = _stopped_line(tmp_path)  # printed by rank 0, which did not receive the signal
    step = int(stopped.group(2))
    assert stopped.group(1) == "SIGTERM" and step < STEPS
    assert f"step {step}: parameters identical on 2 rank(s)" in (out / "log" / "log.txt").read_text()
    assert sorted(os.listdir(out / "ckpt"))[-1] == f"train_state_{step}.pt"
    assert "the launcher as before with train_itm_hard_negatives.py" in stopped.group(4)
