"""The relations comparison: its statistics against hand-computed and simulated values,
scripts/group_scores.py against the full score matrix, and scripts/demo_relations.py end
to end on a tiny demo (2 seeds, 200 steps): curves, steps to learn, finished runs kept, a
run stopped by a signal resumed, parallel runs equal to serial ones."""
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from helpers import launch_cmd, run, wait_until
from scripts.repo import child_env
from scripts.demo_relations import planned_runs
from scripts.relations_stats import curve_area, median_steps, steps_to_learn, twin_outcomes
from utils.retrieval_metrics import winoground_summary
from utils.survival import (fisher_exact, fisher_power, kaplan_meier, logrank, logrank_detectable_hazard_ratio,
                            smallest_detectable_share)


def test_logrank_by_hand():
    # arm a learns at steps 1 and 2, arm b at 3 and 4. At t=1: 2+2 at risk, E_a = 1/2,
    # V = 1/4; t=2: 1+2 at risk, E_a = 1/3, V = 2/9; later arm a has nobody at risk.
    out = logrank([1, 2], [True, True], [3, 4], [True, True])
    assert out["expected_a"] == pytest.approx(5 / 6) and out["observed_a"] == 2
    chi2 = (2 - 5 / 6) ** 2 / (1 / 4 + 2 / 9)
    assert out["chi2"] == pytest.approx(chi2)
    assert out["p"] == pytest.approx(math.erfc(math.sqrt(chi2 / 2)))
    assert out["p"] == pytest.approx(0.0896, abs=1e-4)  # chi-square(1) tail at 2.882
    # censored runs stay at risk at their last step; nobody learning leaves nothing to test
    assert logrank([5, 5], [False, False], [5], [False])["p"] is None
    swapped = logrank([3, 4], [True, True], [1, 2], [True, True])
    assert swapped["chi2"] == pytest.approx(chi2) and swapped["observed_b"] == 2


def test_kaplan_meier_by_hand():
    # 4 runs: learns at 2, censored at 3, learns at 4, censored at 4 (at risk at 4)
    assert kaplan_meier([2, 3, 4, 4], [True, False, True, False]) == [(0, 1.0), (2, 0.75), (4, 0.375)]
    assert kaplan_meier([6, 6], [False, False]) == [(0, 1.0)]
    runs = [{"steps_to_learn": t, "learned": e} for t, e in ((2, True), (3, False), (4, True), (4, False))]
    assert median_steps(runs) == 4 and median_steps(runs[1:2]) is None


def test_fisher_exact_known_tables():
    # the lady tasting tea: 3 of 4 right in each arm's sense, two-sided p = 34/70
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70)
    assert fisher_exact(0, 5, 0, 5) == 1.0 and fisher_exact(5, 5, 0, 5) == pytest.approx(2 / 252)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_fisher_exact_equals_enumeration_of_arrangements(n_a, n_b, data):
    """Every way to place the learned runs among the n_a + n_b runs, equally likely under
    the null: the share no more likely than the observed table's."""
    learned_a = data.draw(st.integers(0, n_a))
    learned_b = data.draw(st.integers(0, n_b))
    total = learned_a + learned_b
    count = {k: math.comb(n_a, k) * math.comb(n_b, total - k) for k in range(0, min(n_a, total) + 1)
             if total - k <= n_b}
    p = sum(c for c in count.values() if c <= count[learned_a]) / sum(count.values())
    assert fisher_exact(learned_a, n_a, learned_b, n_b) == pytest.approx(p, rel=1e-12)


def test_fisher_power_against_simulation_and_the_null():
    rng = np.random.default_rng(0)
    n, sims = 16, 4000
    xs, ys = rng.binomial(n, 0.7, sims), rng.binomial(n, 0.2, sims)
    simulated = np.mean([fisher_exact(int(x), n, int(y), n) < 0.05 for x, y in zip(xs, ys)])
    exact = fisher_power(n, 0.7, n, 0.2)
    assert abs(simulated - exact) < 4 * math.sqrt(exact * (1 - exact) / sims)
    assert fisher_power(n, 0.3, n, 0.3) <= 0.05  # the exact test is conservative
    share = smallest_detectable_share(n, n, 0.2)
    assert fisher_power(n, share, n, 0.2) >= 0.8 > fisher_power(n, share - 0.01, n, 0.2)
    # the simulation: 60% against 20% is found with probability ~0.66 at 20 runs an arm
    assert fisher_power(20, 0.6, 20, 0.2) == pytest.approx(0.66, abs=0.03)


def test_logrank_hazard_ratio_round_trip():
    hr = logrank_detectable_hazard_ratio(30)
    events = 4 * (1.959964 + 0.841621) ** 2 / math.log(hr) ** 2
    assert events == pytest.approx(30, rel=1e-5)
    assert logrank_detectable_hazard_ratio(0) is None


def test_steps_to_learn_and_curve_area():
    points = [{"step": s, "group": g} for s, g in ((250, 0.1), (500, 0.5), (750, 0.9), (1000, 1.0))]
    assert steps_to_learn(points) == (750, True)  # 0.5 is not above one half
    assert steps_to_learn(points[:2]) == (500, False)
    assert curve_area(points) == pytest.approx(((0.1 + 0.5) + (0.5 + 0.9) + (0.9 + 1.0)) / 2 / 3)


def test_plan_is_balanced_seed_by_seed():
    plan = planned_runs(["baseline (fixed masks)", "IAIS singular", "IAIS distributed"], [0, 1], [1, 2])
    assert plan == [("baseline (fixed masks)", 0), ("IAIS singular", 0), ("IAIS distributed", 0),
                    ("baseline (fixed masks)", 1), ("IAIS singular", 1), ("IAIS distributed", 1),
                    ("baseline (fixed masks)", 2), ("IAIS singular", 2)]


VARIANTS = ["baseline (fixed masks)", "IAIS singular"]
STEPS = ["--steps", "200", "--eval_every", "100"]


def _compare(demo, out, *extra):
    return run(["scripts/demo_relations.py", "--demo", str(demo), "--output", str(out), "--seeds", "0",
                "--primary_seeds", "1", "--variants", *VARIANTS, *STEPS,
                "--bootstrap", "200", *extra], timeout=900)


def test_relations_comparison_end_to_end(tmp_path):
    demo = tmp_path / "demo"
    res = run(["scripts/make_demo_data.py", "--output", str(demo), "--n_train", "40", "--n_val", "4",
               "--n_test", "12"])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "rel"
    res = _compare(demo, out, "--parallel", "2")
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "relations.json").read_text())
    assert sorted(results["runs"]) == sorted(f"{v} seed {s}" for v in VARIANTS for s in (0, 1))
    groups = str(demo / "annotations" / "groups_test.json")
    for name, r in results["runs"].items():
        folder = out / f"{'baseline-fixed-masks' if name.startswith('baseline') else 'iais-singular'}-seed{name[-1]}"
        assert [p["step"] for p in r["curve"]] == [100, 200]
        assert (r["steps_to_learn"], r["learned"]) == steps_to_learn(r["curve"])
        # the twins' four pairs scored alone give the full score matrix's Winoground scores
        full = winoground_summary(twin_outcomes(str(folder / "eval" / "score_matrix.pt"), groups))
        assert {k: r["curve"][-1][k] for k in ("own_vs_twin", "text", "image", "group")} == \
            {k: full[k] for k in ("own_vs_twin", "text", "image", "group")}
        assert sorted(os.listdir(folder / "train" / "ckpt")) == ["best.json", "best.pt", "model_step_200.pt",
                                                                 "train_state_200.pt"]
    tests = results["tests"]["IAIS singular vs baseline (fixed masks)"]
    assert tests["fisher"]["n_a"] == tests["fisher"]["n_b"] == 2
    assert "fisher_smallest_share_learned" in results["power"]
    assert (out / "relations.png").stat().st_size > 10_000
    table = (out / "relations.md").read_text()
    assert "| IAIS singular | 2 | " in table and "| baseline (fixed masks) | 2 | " in table
    pooled = json.loads((out / "pooled.json").read_text())
    assert "IAIS singular" in json.dumps(pooled) and (out / "pooled.md").exists()
    assert [s["runs_done"] for s in results["wall_time"]["sittings"]] == [4]

    # finished runs are kept: a second call runs nothing and reports the same
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/run_time.json")}
    res = _compare(demo, out, "--parallel", "2")
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/run_time.json")} == stamps
    again = json.loads((out / "relations.json").read_text())
    assert again["runs"] == results["runs"] and len(again["wall_time"]["sittings"]) == 1

    # a run alone, serially, stopped half-way (SIGTERM to the comparison alone, as `kill` sends
    # it) and continued, is the same run as one beside another and never stopped
    serial = tmp_path / "serial"
    command = launch_cmd(["scripts/demo_relations.py", "--demo", str(demo), "--output", str(serial), "--seeds", "1",
                          "--primary_seeds", "--variants", "IAIS singular", *STEPS, "--bootstrap", "200",
                          "--parallel", "1"])
    ckpt = serial / "iais-singular-seed1" / "train" / "ckpt"
    stopped = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_until(stopped, (ckpt / "train_state_100.pt").exists, timeout=600)
    time.sleep(0.5)  # a few steps past the evaluation grid's checkpoint
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 143 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.rstrip().endswith("the same command continues where it stopped"), err
    states = sorted(int(p.stem.split("_")[-1]) for p in ckpt.glob("train_state_*.pt"))
    assert any(100 < step < 200 for step in states), states  # the run stopped off the grid, at a checkpoint
    assert not (serial / "iais-singular-seed1" / "run_time.json").exists()
    res = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    again = json.loads((serial / "relations.json").read_text())
    assert [s["runs_done"] for s in again["wall_time"]["sittings"]] == [0, 1]
    alone = again["runs"]["IAIS singular seed 1"]
    assert alone["curve"] == results["runs"]["IAIS singular seed 1"]["curve"]
    a = torch.load(serial / "iais-singular-seed1" / "eval" / "score_matrix.pt", weights_only=True)["scores"]
    b = torch.load(out / "iais-singular-seed1" / "eval" / "score_matrix.pt", weights_only=True)["scores"]
    assert torch.equal(a, b)


def test_group_scores_refuses_groups_of_another_split(tmp_path):
    demo = tmp_path / "demo"
    assert run(["scripts/make_demo_data.py", "--output", str(demo), "--n_train", "2", "--n_val", "2",
                "--n_test", "4"]).returncode == 0
    res = run(["scripts/group_scores.py", "--txt_db", str(demo / "txt_db" / "itm_demo_val.db"), "--img_db",
               str(demo / "img_db" / "demo"), "--groups", str(demo / "annotations" / "groups_test.json"),
               "--model_config", "config/uniter-demo.json", "--checkpoints", str(tmp_path / "none.pt"),
               "--output", str(tmp_path / "g.json")])
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "groups_test.json" in res.stderr and not (tmp_path / "g.json").exists()


def test_a_failed_run_ends_the_sitting(tmp_path, monkeypatch):
    """The first run fails: the comparison stops with its line, the runs not yet started
    never start, and the sitting is recorded."""
    import scripts.demo_relations as relations
    demo = tmp_path / "demo"
    (demo / "annotations").mkdir(parents=True)
    (demo / "annotations" / "groups_test.json").write_text("[]")
    started = []

    def fail_first(demo, out, *args):
        started.append(os.path.basename(out))
        if len(started) == 1:
            raise SystemExit(f"demo_relations.py: error: train_itm_hard_negatives.py failed for {out}: no DBs")

    monkeypatch.setattr(relations, "run_one", fail_first)
    out = tmp_path / "rel"
    monkeypatch.setattr("sys.argv", ["demo_relations.py", "--demo", str(demo), "--output", str(out), "--seeds", "0",
                                     "1", "--primary_seeds", "--variants", *VARIANTS, "--parallel", "1"])
    with pytest.raises(SystemExit, match="failed for .*baseline-fixed-masks-seed0"):
        relations.main()
    assert started == ["baseline-fixed-masks-seed0"]
    assert [json.loads(line)["runs_done"] for line in (out / "sittings.jsonl").read_text().splitlines()] == [0]


DRIVER = r"""
import signal, sys, threading, time
from scripts.child_runs import ChildRuns, Stopped
signal.signal(signal.SIGINT, signal.default_int_handler)  # a foreground process of a terminal
log, children = sys.argv[1], ChildRuns()
CHILD = ("import signal, sys, time\n"
         "def note(n, f): open(sys.argv[1], 'a').write(f'{n}\\n')\n"
         "signal.signal(signal.SIGINT, note)\n"
         "open(sys.argv[1], 'a').write('started\\n')\n"
         "time.sleep(1.5)\n"
         "sys.exit(130)\n")
results = []
def worker():
    results.append(children.run([sys.executable, "-c", CHILD, log])[0])
    try:
        children.run([sys.executable, "-c", CHILD, log])
    except Stopped as stop:
        results.append(stop.exit_status)
try:
    with children:
        thread = threading.Thread(target=worker)
        thread.start()
        while True:
            time.sleep(0.05)
except Stopped as stop:
    thread.join()
    print(results, stop.exit_status)
"""


def test_ctrl_c_reaches_each_child_once_and_starts_no_other(tmp_path):
    """SIGINT to the whole process group (Ctrl-C in a terminal): the child hears it once,
    from the parent, and nothing starts after it."""
    log = tmp_path / "signals.txt"
    driver = subprocess.Popen(launch_cmd(["-c", DRIVER, str(log)]), cwd=ROOT, env=child_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_until(driver, lambda: log.exists() and log.read_text(), timeout=60, every=0.02)
    os.killpg(driver.pid, signal.SIGINT)
    out, err = driver.communicate(timeout=60)
    assert out.split() == ["[130,", "130]", "130"], (out, err)
    assert log.read_text().split() == ["started", str(int(signal.SIGINT))]
