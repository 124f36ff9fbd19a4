"""Several seeds pooled per arm (utils/pooled_stats.py, scripts/compare_runs.py): the
statistics against hand-computed cases, their invariants, and the script on synthetic score
matrices and run folders."""
import ast
import csv
import io
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers import run
from scripts import compare_runs
from utils import cli
from utils.config import parse_with_config
from utils.pooled_stats import (resampled_means, seeds_bootstrap, sign_flip_p, summarise, t_cdf, t_quantile,
                                two_level_bootstrap)
from utils.retrieval_metrics import (RECALL_KEYS, group_indices, retrieval_metrics, winoground_outcomes,
                                     winoground_summary)

# ----------------------------------------------------------------------------- statistics


def test_the_statistics_import_only_numpy_and_math():
    with open(f"{ROOT}/utils/pooled_stats.py") as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"math", "numpy"}


@pytest.mark.parametrize("p, df, value", [(0.975, 4, 2.776), (0.975, 1, 12.706), (0.975, 2, 4.303),
                                          (0.975, 10, 2.228), (0.975, 30, 2.042), (0.95, 5, 2.015),
                                          (0.995, 3, 5.841), (0.975, 100000, 1.960), (0.025, 4, -2.776)])
def test_t_quantile_against_the_table(p, df, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=5e-4)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_by_hand():
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert t_cdf(1.5, 2) == pytest.approx(0.5 + 1.5 / (2 * math.sqrt(2 + 1.5 ** 2)), abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_summary_of_three_runs_by_hand():
    s = summarise([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-4)
    assert summarise([0.4]) == {"n": 1, "mean": 0.4, "std": None, "ci95": None}
    same = summarise([0.3, 0.3, 0.3, 0.3])
    assert same["std"] == 0 and same["ci95"] == [0.3, 0.3]


def test_sign_flip_p_by_hand():
    assert sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.01]) == 2 / 32  # only all + and all - are as extreme
    assert sign_flip_p([0.0] * 4) == 1.0
    assert sign_flip_p([1.0, -1.0]) == 1.0
    # 3, -1, 2: |sum| 4; of the 8 sums +-3 +-1 +-2 (6 4 2 0 0 -2 -4 -6) four reach 4
    assert sign_flip_p([3.0, -1.0, 2.0]) == 0.5
    assert sign_flip_p([-3.0, 1.0, -2.0]) == 0.5
    assert sign_flip_p([0.7]) == 1.0


def test_sign_flip_p_beyond_twenty_seeds_is_seeded_monte_carlo():
    d = np.linspace(0.01, 0.05, 25)
    p = sign_flip_p(d, seed=3, n_flips=2000)
    assert p == 1 / 2001 and sign_flip_p(d, seed=3, n_flips=2000) == p  # never 0: the observed counts once
    mixed = np.array([1.0, -1.0] * 12 + [0.5])
    assert sign_flip_p(mixed, seed=1, n_flips=2000) == sign_flip_p(mixed, seed=1, n_flips=2000) > 0.5


def test_bootstraps_by_hand():
    draws = np.array([[0, 1], [1, 1]])
    assert seeds_bootstrap([1.0, 3.0], draws).tolist() == [2.0, 3.0]
    pool = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    # resample 0 takes seed 0 on column 0 and seed 1 on column 1; resample 1 seed 1 on columns 2, 3
    assert two_level_bootstrap(pool, draws).tolist() == [10.5, 35.0]


def test_resampled_means_draw_rows_with_replacement():
    rng = np.random.default_rng(0)
    counts = resampled_means(np.eye(4), 50, rng) * 4          # how often each row was drawn
    assert np.allclose(counts.sum(1), 4) and np.allclose(counts, np.round(counts))
    values = np.stack([np.array([0.0, 1.0] * 50), np.full(100, 0.25)], 1)
    means = resampled_means(values, 3000, np.random.default_rng(1))
    assert means[:, 1] == pytest.approx(0.25) and means[:, 0].mean() == pytest.approx(0.5, abs=0.005)
    assert means[:, 0].std() == pytest.approx(0.05, rel=0.1)  # sqrt(.25 / 100)


def test_twin_values_average_to_the_winoground_scores():
    scores = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    pairs = torch.arange(8).view(4, 2)
    outcomes = winoground_outcomes(scores, pairs, pairs)
    means = compare_runs.twin_values(outcomes).mean(0)
    summary = winoground_summary(outcomes)
    assert means == pytest.approx([summary[k] for k in compare_runs.TWIN_KEYS])


# ----------------------------------------------------------------------------- inputs

# 3 images, 2 texts each (the matrix of tests/test_retrieval_metrics.py)
SCORES = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.5, 0.1], [0.2, 0.8, 0.3],
                       [0.7, 0.6, 0.65], [0.1, 0.2, 0.4], [0.5, 0.6, 0.4]])
GT = torch.tensor([0, 0, 1, 1, 2, 2])
TXT_IDS, IMG_IDS = [f"t{i}" for i in range(6)], ["I0", "I1", "I2"]
TXT2IMG = {t: IMG_IDS[int(j)] for t, j in zip(TXT_IDS, GT)}
GROUPS = [{"caption_0": "t0", "caption_1": "t2", "image_0": "I0", "image_1": "I1"},
          {"caption_0": "t5", "caption_1": "t3", "image_0": "I2", "image_1": "I1"}]


def better(seed):
    """SCORES of a model that also ranks t1's image first (seeds 1, 2) and, on seed 1, has
    t5 prefer its own image I2 over its twin I1."""
    scores = SCORES.clone()
    if seed in (1, 2):
        scores[1, 0] = 0.6
    if seed == 1:
        scores[5, 1] = 0.3
    return scores


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def matrix_run(folder, seed, scores, order=None):
    """A training output_dir (log/hps.json) with its test split's score matrix in eval/."""
    write_json(folder / "log" / "hps.json", {"seed": seed})
    (folder / "eval").mkdir(parents=True)
    txt = list(range(6)) if order is None else order
    torch.save({"scores": scores[txt], "txt_ids": [TXT_IDS[i] for i in txt], "img_ids": IMG_IDS,
                "txt2img": TXT2IMG}, folder / "eval" / "score_matrix.pt")
    return str(folder)


def results_run(folder, seed, counting="textbook", **recalls):
    """A training output_dir with test results only; an earlier step's results are ignored."""
    write_json(folder / "log" / "hps.json", {"seed": seed} if seed is not None else {})
    values = {k: recalls.get(k, 0.5) for k in RECALL_KEYS}
    write_json(folder / "results_test" / "results_100.json", {**values, "counting": counting})
    write_json(folder / "results_test" / "results_99.json", {k: 0.0 for k in RECALL_KEYS} | {"counting": counting})
    return str(folder)


def matrix_arms(tmp_path):
    base = [matrix_run(tmp_path / f"base-s{s}", s, SCORES) for s in (1, 2, 3)]
    # the other arm's runs in another order, one with its rows shuffled
    iais = [matrix_run(tmp_path / f"iais-s{s}", s, better(s), order=[5, 3, 1, 0, 2, 4] if s == 2 else None)
            for s in (3, 1, 2)]
    return base, iais


def compute(argv):
    opts = parse_with_config(compare_runs.build_parser(), [str(a) for a in argv])
    return compare_runs.compute(compare_runs.load_arms(compare_runs.resolve_arms(opts), opts), opts)


def cli_run(argv, monkeypatch, capsys):
    """(exit status, stdout, stderr) of the script run in this process, as on the command line."""
    monkeypatch.setattr(sys, "argv", ["compare_runs.py"] + [str(a) for a in argv])
    code = 0
    try:
        cli.run(compare_runs.main, compare_runs.build_parser())
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- the script


def test_run_folders_with_results_only_by_hand(tmp_path):
    base = [results_run(tmp_path / f"b{s}", s, img_r1=v) for s, v in ((1, 0.5), (2, 0.6), (3, 0.7))]
    other = [results_run(tmp_path / f"o{s}", s, img_r1=v) for s, v in ((3, 0.7), (1, 0.6), (2, 0.8))]
    result = compute(["--arm", "base", *base, "--arm", "other", *other, "--bootstrap", 500])
    s = result["arms"][0]["summary"]["img_r1"]
    half = 4.303 * 0.1 / math.sqrt(3)
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-4)
    assert result["arms"][0]["summary"]["rsum"]["mean"] == pytest.approx(0.6 + 5 * 0.5)
    assert result["arms"][0]["summary"]["img_r5"] == {"n": 3, "mean": 0.5, "std": 0.0, "ci95": [0.5, 0.5]}
    assert [r["source"] for r in result["arms"][0]["runs"]][0].endswith("results_100.json")
    d = result["differences"][0]
    # paired by seed: 0.6 - 0.5, 0.8 - 0.6, 0.7 - 0.7; sums of +-0.1 +-0.2 +-0 reach 0.3 in 4 of 8
    assert d["pairing"] == "by seed" and d["seeds"] == [1, 2, 3] and d["interval"] == "seeds only"
    assert d["metrics"]["img_r1"]["per_seed"] == pytest.approx([0.1, 0.2, 0.0])
    assert d["metrics"]["img_r1"]["diff"] == pytest.approx(0.1) and d["metrics"]["img_r1"]["p"] == 0.5
    lo, hi = d["metrics"]["img_r1"]["ci95"]
    assert -1e-12 <= lo < 0.1 < hi <= 0.2 + 1e-12  # means of three of 0.1, 0.2, 0.0
    assert d["metrics"]["img_r5"] == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "t_ci95": [0.0, 0.0],
                                      "per_seed": [0.0, 0.0, 0.0]}


def test_score_matrices_pool_seeds_and_queries(tmp_path):
    base, iais = matrix_arms(tmp_path)
    write_json(tmp_path / "groups.json", GROUPS)
    argv = ["--arm", "base", *base, "--arm", "iais", *iais, "--groups", tmp_path / "groups.json", "--bootstrap", 300]
    result = compute(argv)
    captions, images = group_indices(str(tmp_path / "groups.json"), TXT_IDS, IMG_IDS)
    per_seed = {}
    for s in (1, 2, 3):
        m = {**retrieval_metrics(better(s), GT), **winoground_summary(winoground_outcomes(better(s), captions, images))}
        b = {**retrieval_metrics(SCORES, GT), **winoground_summary(winoground_outcomes(SCORES, captions, images))}
        per_seed[s] = {k: m[k] - b[k] for k in result["metrics"]}
    iais_summary = result["arms"][1]["summary"]
    assert iais_summary["img_r1"]["mean"] == pytest.approx((4 / 6 + 4 / 6 + 3 / 6) / 3)
    d = result["differences"][0]
    assert d["interval"] == "seeds and queries" and d["pairing"] == "by seed" and d["n"] == 3
    for key in result["metrics"]:
        assert d["metrics"][key]["per_seed"] == pytest.approx([per_seed[s][key] for s in (1, 2, 3)]), key
    assert d["metrics"]["img_r1"]["diff"] == pytest.approx(1 / 9) and d["metrics"]["img_r1"]["p"] == 0.5
    lo, hi = d["metrics"]["img_r1"]["ci95"]
    assert lo < 1 / 9 < hi
    assert d["metrics"]["txt_r5"]["ci95"] == [0.0, 0.0] and d["metrics"]["txt_r5"]["p"] == 1.0
    assert d["metrics"]["own_vs_twin"]["diff"] > 0 and d["metrics"]["own_vs_twin"]["ci95"][1] > 0
    assert compute(argv) == result                                   # seeded
    assert compute(argv + ["--seed", 7])["differences"][0]["metrics"]["img_r1"]["ci95"] != [lo, hi]


def test_swapping_arms_negates_the_differences(tmp_path):
    base, iais = matrix_arms(tmp_path)
    forward = compute(["--arm", "base", *base, "--arm", "iais", *iais, "--bootstrap", 200])["differences"][0]
    backward = compute(["--arm", "iais", *iais, "--arm", "base", *base, "--bootstrap", 200])["differences"][0]
    for key, f in forward["metrics"].items():
        b = backward["metrics"][key]
        assert b["diff"] == pytest.approx(-f["diff"]) and b["p"] == f["p"]
        assert b["per_seed"] == pytest.approx([-x for x in f["per_seed"]])
        assert b["t_ci95"] == pytest.approx([-f["t_ci95"][1], -f["t_ci95"][0]])
        assert b["ci95"] == pytest.approx([-f["ci95"][1], -f["ci95"][0]], abs=1e-12)


def test_a_run_compared_with_itself(tmp_path):
    base, _ = matrix_arms(tmp_path)
    d = compute(["--arm", "a", *base, "--arm", "b", *base])["differences"][0]
    for m in d["metrics"].values():
        assert m["diff"] == 0 and m["p"] == 1.0 and m["ci95"] == [0.0, 0.0] and m["t_ci95"] == [0.0, 0.0]


def test_unknown_seeds_pair_by_position_and_a_single_run_has_no_interval(tmp_path):
    base = [results_run(tmp_path / "b0", None, img_r1=0.5), results_run(tmp_path / "b1", None, img_r1=0.7)]
    other = [results_run(tmp_path / "o0", None, img_r1=0.6), results_run(tmp_path / "o1", None, img_r1=0.6)]
    result = compute(["--arm", "b", *base, "--arm", "o", *other])
    d = result["differences"][0]
    assert d["pairing"].startswith("by position") and d["seeds"] == [None, None]
    assert d["metrics"]["img_r1"]["per_seed"] == pytest.approx([0.1, -0.1]) and d["metrics"]["img_r1"]["p"] == 1.0
    one = results_run(tmp_path / "single", 4, img_r1=0.4)
    result = compute(["--arm", "one", one, "--arm", "one again", one])
    assert result["arms"][0]["summary"]["img_r1"] == {"n": 1, "mean": 0.4, "std": None, "ci95": None}
    assert result["differences"][0]["metrics"]["img_r1"] == {"diff": 0.0, "ci95": None, "p": 1.0, "t_ci95": None,
                                                             "per_seed": [0.0]}
    with pytest.raises(compare_runs.DataError, match="2 and 1 runs"):
        compute(["--arm", "b", *base, "--arm", "one", one])


def test_the_script_writes_every_table(tmp_path):
    base, iais = matrix_arms(tmp_path)
    write_json(tmp_path / "groups.json", GROUPS)
    single = results_run(tmp_path / "single", 1, img_r1=0.25)
    res = run(["scripts/compare_runs.py", "--arm", "base", *base, "--arm", "IAIS_1", *iais, "--arm", "one", single,
               "--output", str(tmp_path / "out" / "table"), "--bootstrap", "100"])
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "out" / "table.md").read_text()
    assert md == res.stdout
    assert "| arm | n | seeds | image R@1 | image R@5 | image R@10 | text R@1 |" in md
    assert "| base | 3 | 1, 2, 3 | 50.00 ± 0.00 [50.00, 50.00] |" in md
    assert "| one | 1 | 1 | 25.00 (n=1) |" in md
    assert "| IAIS_1 - base | 3 by seed, seeds and queries | +11.11 [" in md
    assert "| one - base | 1 by seed, seeds only | -25.00 p=1 |" in md
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and r"base & 3 & 50.00 $\pm$ 0.00 &" in tex
    assert r"IAIS\_1 $-$ base" in tex and "$+11.11$ [" in tex and "±" not in tex
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    img_r1 = next(r for r in rows if r["kind"] == "arm" and r["arm"] == "IAIS_1" and r["metric"] == "img_r1")
    assert float(img_r1["mean"]) == pytest.approx(11 / 18) and img_r1["n"] == "3"
    diff = next(r for r in rows if r["kind"] == "difference" and r["arm"] == "IAIS_1" and r["metric"] == "img_r1")
    assert float(diff["mean"]) == pytest.approx(1 / 9) and float(diff["p"]) == 0.5
    assert diff["interval"] == "seeds and queries"
    out = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [a["name"] for a in out["arms"]] == ["base", "IAIS_1", "one"] and out["bootstrap"] == 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.csv", "table.json", "table.md", "table.tex"]


def test_seed_of_a_score_file_comes_from_its_training_run(tmp_path):
    write_json(tmp_path / "run" / "log" / "hps.json", {"seed": 9})
    folder = tmp_path / "eval"
    folder.mkdir()
    torch.save({"scores": SCORES, "txt_ids": TXT_IDS, "img_ids": IMG_IDS, "txt2img": TXT2IMG}, folder / "s.pt")
    write_json(folder / "config.json", {"checkpoint": str(tmp_path / "run" / "ckpt" / "model_step_5.pt")})
    result = compute(["--arm", "a", folder / "s.pt"])
    assert result["arms"][0]["runs"][0] == {"entry": str(folder / "s.pt"), "source": str(folder / "s.pt"),
                                            "seed": 9, "kind": "score matrix"}


def bad_inputs(tmp_path):
    base, _ = matrix_arms(tmp_path)
    renamed = tmp_path / "renamed.pt"
    torch.save({"scores": SCORES, "txt_ids": TXT_IDS, "img_ids": ["I0", "I1", "I9"],
                "txt2img": {t: i.replace("I2", "I9") for t, i in TXT2IMG.items()}}, renamed)
    empty = tmp_path / "unfinished"
    write_json(empty / "log" / "hps.json", {"seed": 1})
    write_json(tmp_path / "bad_groups.json", [{"caption_0": "t0", "caption_1": "t9", "image_0": "I0", "image_1": "I1"}])
    only_json = results_run(tmp_path / "json-run", 1)
    original = results_run(tmp_path / "original-run", 1, counting="original")
    return {
        "unknown path": (["--arm", "a", tmp_path / "nowhere"], ["--arm a:", "nowhere not found"]),
        "no runs": (["--arm", "a", base[0], "--arm", "b"], ["--arm b has no runs"]),
        "no arm": ([], ["the following arguments are required: --arm"]),
        "twice": (["--arm", "a", base[0], "--arm", "a", base[1]], ["--arm a is given twice"]),
        "run twice": (["--arm", "a", base[0], base[0]], [f"{base[0]} is given twice"]),
        "no results": (["--arm", "a", empty], ["unfinished holds no test results", "inf_itm.py"]),
        "other split": (["--arm", "a", *base, "--arm", "b", renamed], ["renamed.pt: 2 image ids differ", "same split"]),
        "bad groups": (["--arm", "a", *base, "--groups", tmp_path / "bad_groups.json"],
                       ["bad_groups.json: group 0: caption_1 't9' is not a text id"]),
        "groups file": (["--arm", "a", *base, "--groups", tmp_path / "missing.json"], ["--groups", "missing.json"]),
        "groups need matrices": (["--arm", "a", only_json, "--groups", tmp_path / "bad_groups.json"],
                                 ["--groups needs a score matrix", "json-run"]),
        "counting": (["--arm", "a", only_json, "--arm", "b", original], ["original way", "--original_counting 1"]),
        "no common seed": (["--arm", "a", base[0], "--arm", "b", base[1]], ["share no seed"]),
        "bootstrap": (["--arm", "a", base[0], "--bootstrap", -1], ["--bootstrap must be >= 0"]),
        "overwrite": (["--arm", "a", only_json, "--output", tmp_path / "json-run" / "results_test" / "results_100"],
                      ["would overwrite the input", "results_100.json"]),
    }


@pytest.mark.parametrize("case", ["unknown path", "no runs", "no arm", "twice", "run twice", "no results",
                                  "other split", "bad groups", "groups file", "groups need matrices", "counting",
                                  "no common seed", "bootstrap", "overwrite"])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, case):
    argv, needles = bad_inputs(tmp_path)[case]
    before = (tmp_path / "json-run" / "results_test" / "results_100.json").read_text()
    code, out, err = cli_run(argv, monkeypatch, capsys)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("compare_runs.py: error: "), err
    for needle in needles:
        assert needle in err, err
    assert (tmp_path / "json-run" / "results_test" / "results_100.json").read_text() == before
    assert not list(tmp_path.rglob("results_100.md"))


def test_bad_input_from_the_command_line(tmp_path):
    res = run(["scripts/compare_runs.py", "--arm", "a", tmp_path / "nowhere"])
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "nowhere not found" in res.stderr
