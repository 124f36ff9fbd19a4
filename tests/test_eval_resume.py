"""inf_itm.py writes its scores in shards; an evaluation killed on the way continues with
--resume and ends with the score matrix of an uninterrupted one, bit for bit."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import FIXTURES, ROOT, TINY_CONFIG
from helpers import assert_one_line, launch_cmd, run
from scripts.repo import child_env
from test_inference import inf_args

from engine.eval_shards import manifest_changes, shard_blocks, shard_name

SHARD = ["--shard_texts", "7"]  # 60 captions: 9 shards in one process, 5 per process in two
N_CAPTIONS = 60


def shards_of(out):
    folder = out / "shards"
    return sorted(n for n in os.listdir(folder) if n.startswith("scores_")) if folder.is_dir() else []


def snapshot(out):
    """Every file under ``out`` (the lock aside) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def killed_after_shards(out, launcher=None, expected=1, extra=()):
    """Run the evaluation into ``out`` and SIGKILL it (the launcher and its workers) once
    ``expected`` shard files exist; each process halts after its first shard."""
    cmd = launch_cmd(["tests/stop_after_shards.py"] + inf_args(out) + SHARD + list(extra), launcher)
    pids = out.parent / f"{out.name}.pids"
    pids.mkdir()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(STOP_PID_DIR=str(pids)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while len(shards_of(out)) < expected:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "no shard written"
            time.sleep(0.05)
        time.sleep(0.3)  # a second process may still be writing: a kill mid-write must be harmless
    finally:
        for pid in os.listdir(pids):  # the workers (halted, alive) first, then the launcher
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out / "score_matrix.pt").exists()
    return out


def results(out):
    return (torch.load(out / "score_matrix.pt", weights_only=True),
            json.loads((out / "scores.json").read_text()))


def assert_same_results(out, ref):
    matrix, log = results(out)
    ref_matrix, ref_log = ref
    assert torch.equal(matrix["scores"], ref_matrix["scores"])
    assert {k: v for k, v in matrix.items() if k != "scores"} == {k: v for k, v in ref_matrix.items()
                                                                   if k != "scores"}
    assert log == ref_log
    assert not (out / "shards").exists()  # removed once the score matrix is written


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    res = run(inf_args(out) + SHARD)
    assert res.returncode == 0, res.stderr
    assert "pair" in res.stderr and "removed its shards" in res.stderr
    return results(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """An evaluation killed after its first shard (kept: each test works on a copy)."""
    out = killed_after_shards(tmp_path_factory.mktemp("stopped") / "out")
    assert shards_of(out) == [shard_name(0, 1, 0, 6)]
    return out


def copy_of(stopped, tmp_path):
    return shutil.copytree(stopped, tmp_path / "out")


@pytest.mark.parametrize("workers", [[], ["--n_workers", "2", "--worker_type", "thread"]], ids=["in-loop", "threads"])
def test_killed_then_resumed_gives_the_uninterrupted_scores(stopped, tmp_path, uninterrupted, workers):
    """The data loader's workers build batches, not scores: they may change on --resume."""
    out = copy_of(stopped, tmp_path)
    res = run(inf_args(out) + SHARD + ["--resume"] + workers)
    assert res.returncode == 0, res.stderr
    assert "1 shard file(s)" in res.stderr and "scored again" not in res.stderr
    assert f"{7 * 12}/{N_CAPTIONS * 12}" in res.stderr.replace(".0/", "/")  # the bar starts after the shard
    assert_same_results(out, uninterrupted)


def test_two_processes_killed_then_resumed(tmp_path, uninterrupted):
    """Each process writes and resumes its own shards (rank 1 may finish all of its own)."""
    out = killed_after_shards(tmp_path / "out", "torchrun", expected=2)
    names = shards_of(out)
    assert shard_name(0, 2, 0, 6) in names and shard_name(1, 2, 0, 6) in names
    assert len(names) < len(shard_blocks(N_CAPTIONS // 2, 7)) * 2
    res = run(inf_args(out) + SHARD + ["--resume"], launcher="torchrun")
    assert res.returncode == 0, res.stderr
    matrix, log = results(out)
    ref_matrix, ref_log = uninterrupted
    torch.testing.assert_close(matrix["scores"], ref_matrix["scores"], rtol=0, atol=1e-5)
    assert matrix["txt_ids"] == ref_matrix["txt_ids"] and log.keys() == ref_log.keys()
    res = run(inf_args(tmp_path / "whole") + SHARD, launcher="torchrun")
    assert res.returncode == 0, res.stderr
    assert torch.equal(results(tmp_path / "whole")[0]["scores"], matrix["scores"])


def first_error(stderr):
    """The first error line of ``stderr`` and the indented lines that follow it."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if ": error: " in line)
    end = start + 1
    while end < len(lines) and lines[end].startswith("  ") and not lines[end].startswith("  File "):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


@pytest.mark.parametrize("change, lines, launcher", [
    (["--batch_size", "4"], ["batch_size: 8 -> 4"], None),
    (["--checkpoint", os.path.join(FIXTURES, "ref_pretrain.pt")], ["checkpoint.path: ", "checkpoint.size: "], None),
    (["--shard_texts", "5"], ["shard_texts: 7 -> 5"], None),
    (["--amp_dtype", "bf16"], ["amp_dtype: null -> \"bf16\"", "precision: \"float32\" -> \"bfloat16\""], None),
    ([], ["world_size: 1 -> 2"], "torchrun"),
], ids=["batch_size", "checkpoint", "shard_texts", "precision", "world_size"])
def test_resume_with_another_setting_is_refused(stopped, tmp_path, change, lines, launcher):
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    res = run(inf_args(out) + SHARD + ["--resume"] + change, launcher=launcher)
    if launcher:  # every rank stops with the same error: keep the first one's lines
        res.stderr, res.returncode = first_error(res.stderr), 2 if res.returncode else 0
    assert_one_line(res.returncode, res.stderr, "--resume: these settings differ", "manifest.json")
    details = [line.strip() for line in res.stderr.splitlines() if line.startswith("  ")]
    for needle in lines:
        assert any(d.startswith(needle) for d in details), res.stderr
    assert all(" -> " in d for d in details)
    assert snapshot(out) == before


def test_shards_without_resume_are_refused(stopped, tmp_path):
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    res = run(inf_args(out) + SHARD)
    assert_one_line(res.returncode, res.stderr, "unfinished evaluation", "--resume", "another --output_dir")
    assert snapshot(out) == before


def test_overwrite_starts_afresh(stopped, tmp_path, uninterrupted):
    out = copy_of(stopped, tmp_path)
    res = run(inf_args(out) + SHARD + ["--overwrite"])
    assert res.returncode == 0, res.stderr
    assert "removing the shards of an earlier evaluation" in res.stderr
    assert_same_results(out, uninterrupted)


@pytest.mark.parametrize("damage", ["truncated", "other_rows"])
def test_a_damaged_shard_is_scored_again(stopped, tmp_path, uninterrupted, damage):
    out = copy_of(stopped, tmp_path)
    path = out / "shards" / shard_name(0, 1, 0, 6)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        shard = torch.load(path, weights_only=True)
        torch.save({**shard, "txt_ids": shard["txt_ids"][::-1]}, path)
    res = run(inf_args(out) + SHARD + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert f"shard {path}" in res.stderr and "scored again" in res.stderr
    assert_same_results(out, uninterrupted)


def test_resume_without_shards_starts_from_the_first_caption(tmp_path, uninterrupted):
    res = run(inf_args(tmp_path / "out") + SHARD + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert "holds no shards" in res.stderr
    assert_same_results(tmp_path / "out", uninterrupted)


def test_blocks_and_changes():
    assert shard_blocks(15, 7) == [(0, 6), (7, 13), (14, 14)] and shard_blocks(0, 7) == []
    old = {"batch_size": 8, "checkpoint": {"size": 1}, "IAIS": False}
    new = {"batch_size": 4, "checkpoint": {"size": 1}, "IAIS": "singular", "world_size": 2}
    assert manifest_changes(old, new) == ['IAIS: false -> "singular"', "batch_size: 8 -> 4",
                                          "world_size: (none) -> 2"]


def test_gather_scores_of_training_gives_the_same_matrix(uninterrupted, txt_db, img_db):
    """The validation pass of training (gather_scores, no shards) scores as inf_itm.py does."""
    from data import ItmEvalDataset, itm_eval_collate, prefetch_loader
    from engine.checks import load_model
    from engine.evaluation import gather_scores
    from model import IMG_DIM, UniterForImageTextRetrieval
    model, _ = load_model(UniterForImageTextRetrieval, TINY_CONFIG, os.path.join(FIXTURES, "ref_model.pt"),
                          img_dim=IMG_DIM, pairs_num=1)
    dataset = ItmEvalDataset(txt_db, img_db, 8)
    loader = prefetch_loader(dataset, itm_eval_collate, 0, False, "thread", "cpu")
    scores, txt_ids, img_ids = gather_scores(model, loader)
    ref = uninterrupted[0]
    assert txt_ids == ref["txt_ids"] and img_ids == ref["img_ids"]
    torch.testing.assert_close(scores, ref["scores"], rtol=0, atol=1e-6)
