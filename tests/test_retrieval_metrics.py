"""Retrieval metrics (utils/retrieval_metrics.py, scripts/retrieval_metrics.py) against
hand-computed cases."""
import json
import time

import pytest
import torch

from helpers import run
from utils.retrieval_metrics import (bootstrap_recalls, confidence_intervals, fold_metrics, gt_image_index,
                                     paired_comparison, paired_p_value, query_hits, query_ranks,
                                     retrieval_metrics, topk_records, winoground_scores)

# 3 images, 2 texts each (t0 t1 -> I0, t2 t3 -> I1, t4 t5 -> I2)
SCORES = torch.tensor([[0.9, 0.1, 0.2],    # t0: own image first        -> rank 1
                       [0.3, 0.5, 0.1],    # t1: I1 above its I0        -> rank 2
                       [0.2, 0.8, 0.3],    # t2                         -> rank 1
                       [0.7, 0.6, 0.65],   # t3: I0 and I2 above its I1 -> rank 3
                       [0.1, 0.2, 0.4],    # t4                         -> rank 1
                       [0.5, 0.6, 0.4]])   # t5: I0 and I1 above its I2 -> rank 3
GT = torch.tensor([0, 0, 1, 1, 2, 2])
# image queries: I0's best own text 0.9, nothing above -> 1; I1's 0.8 -> 1; I2's 0.4 is
# beaten by t3's 0.65 (t5's tied 0.4 is its own) -> 2
HAND = {"img_r1": 3 / 6, "img_r5": 1.0, "img_r10": 1.0, "txt_r1": 2 / 3, "txt_r5": 1.0, "txt_r10": 1.0,
        "img_medr": 1, "txt_medr": 1}


def test_recall_and_median_rank_by_hand():
    txt_ranks, img_ranks = query_ranks(SCORES, GT)
    assert txt_ranks.tolist() == [1, 2, 1, 3, 1, 3] and img_ranks.tolist() == [1, 1, 2]
    metrics = retrieval_metrics(SCORES, GT)
    assert metrics == pytest.approx({**HAND, "rsum": 3 / 6 + 2 + 2 / 3 + 2})
    assert isinstance(metrics["img_medr"], int)
    # the lower of the two middle ranks: ranks 1 1 1 2 3 3 -> 1 above, ranks 1 2 3 4 -> 2
    assert retrieval_metrics(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0],
                                           [1.0, 1.0, 0.5, 0.0], [1.0] * 4]), torch.arange(4))["img_medr"] == 2


def test_original_counting_adds_the_rows_below_k():
    """The original also counts a hit for each of the first K rows whose image is in its top
    10: with six texts that all find their image within 10, R@10 reaches 200%."""
    metrics = retrieval_metrics(SCORES, GT, original_counting=True)
    assert metrics["img_r1"] == pytest.approx((3 + 1) / 6)
    assert metrics["img_r5"] == pytest.approx((6 + 5) / 6)
    assert metrics["img_r10"] == pytest.approx((6 + 6) / 6)
    assert {k: metrics[k] for k in ("txt_r1", "txt_r5", "txt_r10")} == pytest.approx(
        {k: HAND[k] for k in ("txt_r1", "txt_r5", "txt_r10")})


def test_ties_count_against_the_query():
    scores = torch.tensor([[0.5, 0.5],    # t0 -> I0, tied with I1: rank 2
                           [0.4, 0.2],    # t1 -> I0: rank 1
                           [0.3, 0.3]])   # t2 -> I1, tied with I0: rank 2
    txt_ranks, img_ranks = query_ranks(scores, torch.tensor([0, 0, 1]))
    assert txt_ranks.tolist() == [2, 1, 2]
    # I0: own best 0.5, t2's 0.3 is below -> 1; I1: own 0.3, t0's 0.5 at or above -> 2
    assert img_ranks.tolist() == [1, 2]
    # an image's own texts tied at the top cost nothing, another text tied with them does
    own_tie = torch.tensor([[0.7, 0.0], [0.7, 0.0], [0.6, 1.0]])
    assert query_ranks(own_tie, torch.tensor([0, 0, 1]))[1].tolist() == [1, 1]
    other_tie = torch.tensor([[0.7, 0.0], [0.7, 0.0], [0.7, 1.0]])
    assert query_ranks(other_tie, torch.tensor([0, 0, 1]))[1].tolist() == [2, 1]
    # a model that scores everything alike finds nothing
    flat = retrieval_metrics(torch.zeros(4, 4), torch.arange(4))
    assert flat["img_r1"] == flat["txt_r1"] == 0 and flat["img_medr"] == flat["txt_medr"] == 4


def test_non_finite_scores_rank_above_the_true_match():
    nan = float("nan")
    txt_ranks, img_ranks = query_ranks(torch.tensor([[0.9, nan, 0.1], [0.2, 0.1, nan]]), torch.tensor([0, 2]))
    assert txt_ranks.tolist() == [2, 3]
    # I1 has no text: n_txt + 1; I2's own score is NaN: the only other text ranks above it
    assert img_ranks.tolist() == [1, 3, 2]


def test_images_without_texts_are_candidates_but_no_queries():
    """I1 and I2 have no text: nothing can be found for them, so they are no image query
    (counted as misses they would turn a perfect text R@1 into 1/3), but they stay
    candidates of the text queries (I2 outscores I0 for the second text)."""
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.1, 0.5]])
    metrics = retrieval_metrics(scores, torch.tensor([0, 0]))
    assert metrics["txt_r1"] == 1.0 and metrics["txt_medr"] == 1
    assert metrics["img_r1"] == 0.5 and metrics["img_r5"] == 1.0


def test_folds_follow_the_split_order_of_the_images():
    """Columns are sorted differently from the split (inf_itm.py sorts them by box count):
    folds take consecutive images in the order of their first texts."""
    # texts t0..t3 belong to images A B C D; columns in the order C A D B
    scores = torch.tensor([[0.9, 0.5, 0.2, 0.1],    # t0 (A): C above A
                           [0.1, 0.6, 0.1, 0.5],    # t1 (B): A above B
                           [0.5, 0.9, 0.4, 0.0],    # t2 (C): A above C
                           [0.1, 0.1, 0.5, 0.1]])   # t3 (D)
    gt = torch.tensor([1, 3, 0, 2])
    assert retrieval_metrics(scores, gt)["img_r1"] == pytest.approx(1 / 4)
    folds = fold_metrics(scores, gt, 2)
    # fold {A, B}: t0 rank 1, t1 rank 2; A's own text is beaten by t1, B's is not.
    # fold {C, D}: everything first. (Folds {C, A} and {D, B} would give img_r1 0.5.)
    assert folds["img_r1"] == pytest.approx((1 / 2 + 1) / 2)
    assert folds["txt_r1"] == pytest.approx((1 / 2 + 1) / 2)
    assert folds["img_r5"] == folds["txt_r5"] == 1.0 and folds["img_medr"] == 1
    assert fold_metrics(scores, gt, 1) == pytest.approx(retrieval_metrics(scores, gt))


def hits_of(values):
    """query_hits-shaped dict with the same per-query values for every recall key."""
    v = torch.tensor(values, dtype=torch.float64)
    return {f"{side}_r{k}": v for side in ("img", "txt") for k in (1, 5, 10)}


def test_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    hits = hits_of([1.0, 0.0] * 200)
    boot = bootstrap_recalls([hits], 2000, seed=3)["img_r1"][0]
    # resampling 400 queries with half hits: the recall's standard error is sqrt(.25 / 400)
    assert boot.mean().item() == pytest.approx(0.5, abs=0.005)
    assert boot.std().item() == pytest.approx(0.025, rel=0.1)
    ci = confidence_intervals(hits, 2000, seed=3)
    assert ci["img_r1"] == pytest.approx([0.5 - 1.96 * 0.025, 0.5 + 1.96 * 0.025], abs=0.01)
    assert confidence_intervals(hits, 2000, seed=3) == ci
    assert confidence_intervals(hits, 2000, seed=4) != ci
    assert confidence_intervals(hits_of([1.0] * 50), 100, seed=0)["txt_r5"] == [1.0, 1.0]


def test_paired_p_value_by_hand():
    assert paired_p_value(torch.tensor([1.0, 2.0, -1.0, 3.0])) == pytest.approx(2 * (1 + 1) / 5)
    assert paired_p_value(torch.tensor([0.0, 0.0, 0.0])) == 1.0
    assert paired_p_value(torch.tensor([1.0] * 99)) == pytest.approx(2 / 100)


def test_paired_comparison_resamples_the_same_queries():
    """System b misses 20 of the 1000 queries that a finds and is otherwise the same: on the
    same resampled queries a can never do worse, so the interval stays above 0 and p is the
    smallest the resamples can give. (Resampling each system on its own would not.)"""
    a = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.6).double()
    b = a.clone()
    b[a.nonzero()[:20, 0]] = 0
    result = paired_comparison(hits_of(a.tolist()), hits_of(b.tolist()), 999, seed=0)
    assert result["img_r1"]["diff"] == pytest.approx(0.02)
    lo, hi = result["img_r1"]["ci95"]
    assert 0 < lo < 0.02 < hi < 0.04
    assert result["txt_r10"]["p"] == pytest.approx(2 / 1000)
    same = paired_comparison(hits_of(a.tolist()), hits_of(a.tolist()), 200, seed=0)["img_r5"]
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}


def test_bootstrap_speed_sanity():
    n_img, n_txt = 1000, 5000
    gt = torch.arange(n_txt) // 5
    scores = torch.randn(n_txt, n_img, generator=torch.Generator().manual_seed(0))
    scores[torch.arange(n_txt), gt] += 2
    start = time.time()
    hits = query_hits(*query_ranks(scores, gt))
    fold_metrics(scores, gt, 5)
    paired_comparison(hits, hits, 1000, seed=0)
    assert time.time() - start < 15  # about 0.5 s on 2 idle cores


def test_winoground_scores_by_hand():
    # four groups on the diagonal blocks of an 8 x 8 matrix (rows captions, columns images)
    blocks = [[[0.9, 0.1], [0.2, 0.8]],    # text and image
              [[0.9, 0.4], [0.6, 0.5]],    # text only: caption 1 prefers image 0
              [[0.5, 0.2], [0.7, 0.8]],    # image only: image 0 prefers caption 1
              [[0.5, 0.5], [0.5, 0.5]]]    # ties fail
    scores = torch.full((8, 8), -1.0)
    for g, block in enumerate(blocks):
        scores[2 * g:2 * g + 2, 2 * g:2 * g + 2] = torch.tensor(block)
    pairs = torch.arange(8).view(4, 2)
    # captions scoring their own image above the other one: 2 + 1 + 2 + 0 of 8
    assert winoground_scores(scores, pairs, pairs) == {"text": 0.5, "image": 0.5, "group": 0.25,
                                                       "own_vs_twin": 5 / 8, "n": 4}


def test_topk_records_by_hand():
    txt_ids, img_ids = [f"t{i}" for i in range(6)], ["I0", "I1", "I2"]
    records = list(topk_records(SCORES, txt_ids, img_ids, GT, 2))
    assert records[3] == {"query": "text", "id": "t3", "target": "I1", "rank": 3, "topk_ids": ["I0", "I2"],
                          "topk_scores": pytest.approx([0.7, 0.65])}
    assert records[6] == {"query": "image", "id": "I0", "targets": ["t0", "t1"], "rank": 1,
                          "topk_ids": ["t0", "t3"], "topk_scores": pytest.approx([0.9, 0.7])}
    assert records[8]["rank"] == 2 and records[8]["targets"] == ["t4", "t5"]
    assert len(records) == 9


def test_gt_image_index_names_a_text_without_image():
    assert gt_image_index(["a", "b"], ["x", "y"], {"a": "y", "b": "x"}).tolist() == [1, 0]
    with pytest.raises(ValueError, match="'b'"):
        gt_image_index(["a", "b"], ["x", "y"], {"a": "y", "b": "z"})


# ----------------------------------------------------------------------------- the script

TXT_IDS = [f"t{i}" for i in range(6)]
IMG_IDS = ["I0", "I1", "I2"]
TXT2IMG = {t: IMG_IDS[int(j)] for t, j in zip(TXT_IDS, GT)}


def score_file(path, scores=SCORES, txt_ids=TXT_IDS, img_ids=IMG_IDS, **overrides):
    data = {"scores": scores, "txt_ids": txt_ids, "img_ids": img_ids, "txt2img": TXT2IMG, **overrides}
    torch.save({k: v for k, v in data.items() if v is not None}, path)
    return str(path)


def metrics_cli(*args):
    return run(["scripts/retrieval_metrics.py", *map(str, args)])


def test_script_writes_every_metric(tmp_path):
    groups = [{"caption_0": "t0", "caption_1": "t2", "image_0": "I0", "image_1": "I1"},
              {"caption_0": "t5", "caption_1": "t3", "image_0": "I2", "image_1": "I1"}]
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    # the other model: rows and columns in another order, t1 now finds its image first
    other = SCORES.clone()
    other[1, 0] = 0.6
    order = [5, 4, 3, 2, 1, 0]
    other_file = score_file(tmp_path / "other.pt", other[order][:, [2, 0, 1]], [TXT_IDS[i] for i in order],
                            ["I2", "I0", "I1"])
    res = metrics_cli(score_file(tmp_path / "s.pt"), "--folds", 3, "--bootstrap", 200, "--seed", 1, "--compare",
                      other_file, "--groups", tmp_path / "groups.json", "--output", tmp_path / "m.json")
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "m.json").read_text())
    assert {k: out[k] for k in HAND} == pytest.approx(HAND)
    assert out["counting"] == "textbook" and out["n_texts"] == 6 and out["n_images"] == 3
    # one image per fold: every text finds it
    assert out["folds"] == pytest.approx({"n": 3, "img_r1": 1, "img_r5": 1, "img_r10": 1, "txt_r1": 1,
                                          "txt_r5": 1, "txt_r10": 1, "rsum": 6, "img_medr": 1, "txt_medr": 1})
    assert set(out["ci95"]) == set(HAND) - {"img_medr", "txt_medr"}
    assert out["ci95"]["img_r10"] == [1.0, 1.0] and out["ci95"]["img_r1"][0] < 0.5 < out["ci95"]["img_r1"][1]
    assert out["compare"]["img_r1"]["diff"] == pytest.approx(-1 / 6)
    assert out["compare"]["img_r5"] == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    # group 0: t0/I0 vs t2/I1 passes both; group 1: t5 prefers I1 (0.6) over its I2 (0.4),
    # t3 its I2 (0.65) over its I1 (0.6): two of the four captions score their own image higher
    assert out["winoground"] == {"text": 0.5, "image": 0.5, "group": 0.5, "own_vs_twin": 0.5, "n": 2}
    assert "image retrieval" in res.stdout and "Winoground (2 groups)" in res.stdout
    res = metrics_cli(tmp_path / "s.pt", "--original_counting", 1, "--output", tmp_path / "o.json")
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["counting"] == "original" and out["img_r10"] == pytest.approx(2.0)


def one_line_error(res, *parts):
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


@pytest.mark.parametrize("groups, message", [
    ({"caption_0": "t0"}, "non-empty JSON list"),
    ([{"caption_0": "t0", "caption_1": "t1", "image_0": "I0"}], "group 0 lacks 'image_1'"),
    ([{"caption_0": "t0", "caption_1": "t1", "image_0": "I0", "image_1": "I1"},
      {"caption_0": "t0", "caption_1": "t9", "image_0": "I0", "image_1": "I1"}], "group 1: caption_1 't9'"),
    ([{"caption_0": "t0", "caption_1": "t1", "image_0": "t2", "image_1": "I1"}], "is not an image id"),
])
def test_script_malformed_groups(tmp_path, groups, message):
    (tmp_path / "g.json").write_text(json.dumps(groups))
    res = metrics_cli(score_file(tmp_path / "s.pt"), "--groups", tmp_path / "g.json", "--output", tmp_path / "m.json")
    one_line_error(res, "g.json", message)
    assert not (tmp_path / "m.json").exists()


def test_script_bad_inputs_are_one_line(tmp_path):
    good = score_file(tmp_path / "s.pt")
    one_line_error(metrics_cli(score_file(tmp_path / "old.pt", txt2img=None), "--output", tmp_path / "m.json"),
                   "old.pt lacks txt2img")
    renamed = score_file(tmp_path / "o.pt", img_ids=["I0", "I1", "I9"],
                         txt2img={t: img.replace("I2", "I9") for t, img in TXT2IMG.items()})
    one_line_error(metrics_cli(good, "--compare", renamed, "--output", tmp_path / "m.json"),
                   "o.pt: 2 image ids differ", "same split")
    moved = score_file(tmp_path / "moved.pt", txt2img={t: "I0" for t in TXT_IDS})
    one_line_error(metrics_cli(good, "--compare", moved, "--output", tmp_path / "m.json"),
                   "moved.pt: its texts belong to other images")
    one_line_error(metrics_cli(score_file(tmp_path / "x.pt", txt2img={"t0": "I0"}), "--output", tmp_path / "m.json"),
                   "x.pt: text 't1' has no image")
    one_line_error(metrics_cli(score_file(tmp_path / "n.pt", SCORES.clone().fill_(float("nan"))),
                               "--output", tmp_path / "m.json"), "n.pt: 18 scores are NaN")
    one_line_error(metrics_cli(score_file(tmp_path / "t.pt", txt_ids=tuple(TXT_IDS)), "--output", tmp_path / "m.json"),
                   "t.pt: txt_ids of the wrong type")
    one_line_error(metrics_cli(score_file(tmp_path / "r.pt", SCORES[:5]), "--output", tmp_path / "m.json"),
                   "r.pt: scores are (5, 3) but the file names 6 texts")
    one_line_error(metrics_cli(good, "--folds", 4, "--output", tmp_path / "m.json"), "--folds 4", "3 images")
    one_line_error(metrics_cli(good), "the following arguments are required: --output")
    one_line_error(metrics_cli(tmp_path / "missing.pt", "--output", tmp_path / "m.json"), "missing.pt not found")
    assert not (tmp_path / "m.json").exists()


def test_quick_validation_counts_ranks_the_same_way():
    """validate(): each batch holds one text's true image first, then its candidates."""
    from engine.evaluation import validate

    class FixedScores(torch.nn.Module):
        def forward(self, batch, compute_loss=False):
            return batch["scores"][:, None], {}

    batches = [{"scores": torch.tensor([0.9, 0.1, 0.5])},                 # rank 1
               {"scores": torch.tensor([0.2, 0.5, 0.2, 0.3, 0.0])},       # 0.5, the tied 0.2, 0.3 above: rank 4
               {"scores": torch.tensor([0.4] + [0.5] * 6 + [0.1] * 9)}]   # rank 7
    log = validate(FixedScores(), batches)
    assert [log[f"valid/recall_{k}"] for k in (1, 5, 10)] == pytest.approx([1 / 3, 2 / 3, 1.0])
