"""log/run.json records what ran (command line, code, versions, ranks), one entry per
launch; log/model.json the model config as trained (with --dropout)."""
import json
import subprocess
import sys

import pytest
import torch

from engine import run_info
from engine.run_info import git_state, launch_record, record_launch
from helpers import copy_stopped_at, run, tiny_train_config


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"] + list(args), check=True,
                   capture_output=True)


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="no git")
def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_state(str(tmp_path)) == {"commit": head.strip(), "dirty": False}
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_state(str(tmp_path))["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(str(tmp_path)) == {"commit": head.strip(), "dirty": True}


def test_no_checkout_or_no_git_is_null_not_an_error(tmp_path, monkeypatch):
    assert git_state(str(tmp_path)) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert git_state(run_info.CODE_ROOT) == {"commit": None, "dirty": None}

    def too_slow(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", run_info.GIT_TIMEOUT_S)
    monkeypatch.setattr(subprocess, "run", too_slow)
    assert git_state(run_info.CODE_ROOT) == {"commit": None, "dirty": None}


def test_launch_record_of_one_process(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_itm_hard_negatives.py", "--config", "c.json"])
    entry = launch_record(torch.device("cpu"), "2024-01-01T00:00:00+00:00")
    assert entry["argv"] == ["train_itm_hard_negatives.py", "--config", "c.json"]
    assert entry["started"] == "2024-01-01T00:00:00+00:00"
    assert entry["torch"] == torch.__version__ and entry["cuda"] == torch.version.cuda
    assert entry["world_size"] == 1 and entry["devices"] == ["cpu"] and len(entry["hosts"]) == 1
    assert entry["ranks"][0]["rank"] == 0 and entry["ranks"][0]["host"] == entry["hosts"][0]
    assert set(entry["git"]) == {"commit", "dirty"} and "nccl" in entry
    json.dumps(entry)


def test_resume_appends_and_a_new_run_starts_the_list(tmp_path):
    record_launch(str(tmp_path), {"argv": ["first"]}, resumed=False)
    record_launch(str(tmp_path), {"argv": ["second"]}, resumed=True)
    assert [e["argv"] for e in json.loads((tmp_path / "run.json").read_text())] == [["first"], ["second"]]
    record_launch(str(tmp_path), {"argv": ["afresh"]}, resumed=False)
    assert [e["argv"] for e in json.loads((tmp_path / "run.json").read_text())] == [["afresh"]]


def test_an_unreadable_record_is_kept_aside(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    record_launch(str(tmp_path), {"argv": ["next"]}, resumed=True)
    assert (tmp_path / "run.json.unreadable").read_text() == "{not json"
    assert json.loads((tmp_path / "run.json").read_text()) == [{"argv": ["next"]}]


def test_training_records_its_launches_and_the_model_as_trained(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=4, valid_steps=2, dropout=0.0)
    ref = tmp_path / "ref"
    args = ["train_itm_hard_negatives.py", "--config", cfg]
    res = run(args + ["--output_dir", str(ref)])
    assert res.returncode == 0, res.stderr[-3000:]
    model = json.loads((ref / "log" / "model.json").read_text())
    assert model["hidden_dropout_prob"] == model["attention_probs_dropout_prob"] == 0.0  # not the file's 0.1
    (first,) = json.loads((ref / "log" / "run.json").read_text())
    assert first["argv"][1:] == args[1:] + ["--output_dir", str(ref)]
    assert first["world_size"] == 1 and first["devices"] == ["cpu"]
    assert first["git"]["commit"] is None or len(first["git"]["commit"]) == 40

    out = copy_stopped_at(ref, tmp_path / "resumed", (4,))
    res = run(args + ["--output_dir", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    launches = json.loads((out / "log" / "run.json").read_text())
    assert len(launches) == 2 and launches[0] == first and launches[1]["argv"][-1] == "--resume"
    assert json.loads((out / "log" / "model.json").read_text()) == model
