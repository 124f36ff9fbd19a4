"""inf_itm.py reproduces the original's evaluation of the fixture split."""
import json
import os

import pytest
import torch

from conftest import FIXTURES, IMG_DB, TINY_CONFIG, TXT_DB, load_fixture
from helpers import horovod_available, run

REF = load_fixture("ref_eval.pt")


def inf_args(out, checkpoint=os.path.join(FIXTURES, "ref_model.pt"), *extra):
    return ["inf_itm.py", "--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoint", checkpoint,
            "--model_config", TINY_CONFIG, "--output_dir", str(out), "--batch_size", "8",
            "--n_workers", "0", *extra]


def check_outputs(out):
    with open(out / "scores.json") as f:
        assert json.load(f) == REF["eval_log"]
    saved = torch.load(out / "score_matrix.pt", weights_only=True)
    assert saved["txt_ids"] == REF["txt_ids"] and saved["img_ids"] == REF["img_ids"]
    torch.testing.assert_close(saved["scores"], REF["score"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [["--n_workers", "0"], ["--n_workers", "2", "--worker_type", "thread"]],
                         ids=["in-loop", "threads"])
def test_single_process(tmp_path, workers):
    res = run(inf_args(tmp_path / "out") + workers)
    assert res.returncode == 0, res.stderr
    check_outputs(tmp_path / "out")
    assert "image retrieval" in res.stdout and "51.67" in res.stdout


def test_torchrun_two_processes(tmp_path):
    res = run(inf_args(tmp_path / "out"), launcher="torchrun")
    assert res.returncode == 0, res.stderr
    check_outputs(tmp_path / "out")


@pytest.mark.skipif(not horovod_available(), reason="horovod is not installed (make test installs it)")
def test_horovodrun_two_processes(tmp_path):
    res = run(inf_args(tmp_path / "out"), launcher="horovodrun")
    assert res.returncode == 0, res.stderr + res.stdout
    check_outputs(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_scores(tmp_path, dtype):
    """Autocast really applies (scores move) and costs no more than a few units of the
    dtype's resolution at the scores' scale."""
    res = run(inf_args(tmp_path / "out") + ["--amp_dtype", {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]])
    assert res.returncode == 0, res.stderr
    scores = torch.load(tmp_path / "out" / "score_matrix.pt", weights_only=True)["scores"]
    err = (scores - REF["score"]).abs().max().item()
    assert 0 < err <= 8 * torch.finfo(dtype).eps * REF["score"].abs().max().item()


def test_zero_shot_from_pretraining_checkpoint(tmp_path):
    """No rank_output in the checkpoint: scores come from the ITM head (init_output)."""
    res = run(inf_args(tmp_path / "out", os.path.join(FIXTURES, "ref_pretrain.pt")))
    assert res.returncode == 0, res.stderr
    saved = torch.load(tmp_path / "out" / "score_matrix.pt", weights_only=True)
    ref = load_fixture("ref_pretrain_out.pt")
    torch.testing.assert_close(saved["scores"][0][:, None], ref["scores_text0"], rtol=0, atol=1e-5)


def test_bad_input_is_one_line(tmp_path):
    res = run(inf_args(tmp_path / "out", str(tmp_path / "missing.pt")))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "missing.pt not found" in res.stderr
    res = run(inf_args(tmp_path / "out")[:-4] + ["--batch_size", "64", "--n_workers", "0"])
    assert res.returncode == 2 and "mini-batch size 64" in res.stderr
