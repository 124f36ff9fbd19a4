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


ORIGINAL = ["--original_counting", "1"]


def check_outputs(out):
    with open(out / "scores.json") as f:
        # the original's log exactly, and beside it what was scored: the fixture's 60 captions of 12 images
        assert json.load(f) == {**REF["eval_log"], "counting": "original", "n_texts": 60, "n_images": 12,
                                "unmatched_images": []}
    saved = torch.load(out / "score_matrix.pt", weights_only=True)
    assert saved["txt_ids"] == REF["txt_ids"] and saved["img_ids"] == REF["img_ids"]
    torch.testing.assert_close(saved["scores"], REF["score"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [["--n_workers", "0"], ["--n_workers", "2", "--worker_type", "thread"]],
                         ids=["in-loop", "threads"])
def test_single_process(tmp_path, workers):
    res = run(inf_args(tmp_path / "out") + workers + ORIGINAL)
    assert res.returncode == 0, res.stderr
    check_outputs(tmp_path / "out")
    assert "image retrieval" in res.stdout and "51.67" in res.stdout


def test_default_batch_size_serves_a_small_split(tmp_path):
    """The default --batch_size 400 on the fixture's 12 images: reduced to 12, said once,
    and the scores are those of a mini-batch that fits."""
    args = inf_args(tmp_path / "out")
    at = args.index("--batch_size")
    res = run(args[:at] + args[at + 2:] + ORIGINAL)
    assert res.returncode == 0, res.stderr
    said = [line for line in res.stderr.splitlines() if "is more than" in line]
    assert len(said) == 1 and "--batch_size 400 is more than the 12 images of" in said[0], res.stderr
    assert said[0].endswith("using 12")
    check_outputs(tmp_path / "out")


def test_torchrun_two_processes(tmp_path):
    res = run(inf_args(tmp_path / "out") + ORIGINAL, launcher="torchrun")
    assert res.returncode == 0, res.stderr
    check_outputs(tmp_path / "out")


@pytest.mark.skipif(not horovod_available(), reason="horovod is not installed (make test installs it)")
def test_horovodrun_two_processes(tmp_path):
    res = run(inf_args(tmp_path / "out") + ORIGINAL, launcher="horovodrun")
    assert res.returncode == 0, res.stderr + res.stdout
    check_outputs(tmp_path / "out")


def textbook_ranks(scores, gt_columns):
    """1 + the number of other candidates scoring at least as high, by plain loops."""
    return [1 + sum(1 for j, s in enumerate(row) if j != gt and s >= row[gt])
            for row, gt in zip(scores.tolist(), gt_columns)]


def test_default_is_textbook_recall_with_a_self_contained_score_file(tmp_path):
    """The default counts each query once: the fixture's image R@K drop by the original's extra
    hits of rows 0..K-1, text R@K stay; the score file names each text's image; topk.jsonl
    lists every query's best candidates and its rank."""
    res = run(inf_args(tmp_path / "out") + ["--dump_topk", "3"])
    assert res.returncode == 0, res.stderr
    log = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert log["counting"] == "textbook" and "textbook" in res.stdout
    saved = torch.load(tmp_path / "out" / "score_matrix.pt", weights_only=True)
    txt2img = json.loads(open(os.path.join(TXT_DB, "txt2img.json")).read())
    assert saved["txt2img"] == {t: txt2img[t] for t in REF["txt_ids"]}
    gt = [REF["img_ids"].index(txt2img[t]) for t in REF["txt_ids"]]
    ranks = textbook_ranks(REF["score"], gt)
    n = len(ranks)
    for k in (1, 5, 10):
        assert log[f"img_r{k}"] == pytest.approx(sum(r <= k for r in ranks) / n, abs=1e-12)
        assert log[f"txt_r{k}"] == REF["eval_log"][f"txt_r{k}"]
    assert [round(log[f"img_r{k}"] * n) for k in (1, 5, 10)] == [5, 26, 50]  # original: 6, 31, 60
    lines = [json.loads(line) for line in (tmp_path / "out" / "topk.jsonl").read_text().splitlines()]
    texts, images = lines[:n], lines[n:]
    assert [q["id"] for q in texts] == REF["txt_ids"] and [q["id"] for q in images] == REF["img_ids"]
    assert [q["rank"] for q in texts] == ranks
    for q, row in zip(texts, REF["score"]):
        best = row.topk(3)
        assert q["topk_ids"] == [REF["img_ids"][j] for j in best.indices.tolist()]
        assert q["topk_scores"] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert q["target"] == txt2img[q["id"]]
    for j, q in enumerate(images):
        own = [r for r, t in enumerate(REF["txt_ids"]) if txt2img[t] == q["id"]]
        column = REF["score"][:, j].tolist()
        best_own = max(column[r] for r in own)
        assert q["targets"] == [REF["txt_ids"][r] for r in own]
        assert q["rank"] == 1 + sum(1 for r, s in enumerate(column) if r not in own and s >= best_own)
        assert len(q["topk_ids"]) == 3 and q["topk_scores"] == sorted(q["topk_scores"], reverse=True)


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
    res = run(inf_args(tmp_path / "out") + ["--dump_topk", "-1"])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--dump_topk" in res.stderr
