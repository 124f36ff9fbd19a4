"""Does IAIS help a model learn relations? The demo trained four ways over many seeds, with
the test twins measured along the way.

    python scripts/demo_relations.py --demo demo --output demo/relations [--parallel 2]

Variants: the baseline as the original trains it (image-side masks of the original), the
baseline with the masks of its padded layout (--fix_image_side_masks, the fair baseline),
IAIS singular and IAIS distributed (whose image-side batches have correct masks anyway).
Every variant runs ``--seeds``; the two arms of the primary test (the fair baseline and
IAIS singular) also run ``--primary_seeds``. Each run trains the demo config (twins among
the negatives) with its seed, keeping a checkpoint every ``--eval_every`` steps; the test
twins are scored at each (scripts/group_scores.py: own-vs-twin, Winoground text, image,
group), then the last weights are evaluated in full (inf_itm.py: R@K) and their ISD
measured (scripts/isd.py). The checkpoints between are removed once scored.

A run's outcome is its **steps to learn**: the first evaluation at which its group score
exceeds 50, censored at the last step when none does. Declared before the runs:
primary, the log-rank test of steps to learn, IAIS singular against the fair baseline;
secondary, Fisher's exact test of learned-by-the-last-step, and a bootstrap interval (runs
resampled within each arm) of the difference in area under the mean group-score curve.

Finished runs in OUTPUT are kept and not run again, so a comparison stopped half-way
continues where it stopped; ``--report_only`` reports on the finished runs without
running any. Writes OUTPUT/relations.json (every run with its curve, per arm the end
points, the tests, the power of the design, the wall time of every sitting, also kept in
OUTPUT/sittings.jsonl), OUTPUT/relations.png (mean group-score curves with 95% bands and
every run, beside Kaplan-Meier curves of steps to learn), OUTPUT/relations.md (the tables),
OUTPUT/pooled.{md,tex,csv,json}
(scripts/compare_runs.py on the last weights, runs pooled per arm) and prints the tables.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import glob
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from os.path import exists, join

import numpy as np
import torch

from scripts.repo import ROOT, child_env
from utils.outputs import atomic_write, write_json
from utils.pooled_stats import summarise
from utils.retrieval_metrics import (group_indices, paired_p_value, percentile_interval,
                                     winoground_outcomes, winoground_summary)
from utils.survival import (fisher_exact, kaplan_meier, logrank, logrank_detectable_hazard_ratio,
                            smallest_detectable_share)

# name: (folder, training flags)
VARIANTS = {"baseline (original masks)": ("baseline-original-masks", []),
            "baseline (fixed masks)": ("baseline-fixed-masks", ["--fix_image_side_masks"]),
            "IAIS singular": ("iais-singular", ["--IAIS", "singular"]),
            "IAIS distributed": ("iais-distributed", ["--IAIS", "distributed"])}
FAIR, PRIMARY = "baseline (fixed masks)", "IAIS singular"
TWIN_METRICS = ("own_vs_twin", "text", "image", "group")
METRICS = TWIN_METRICS + ("img_r1", "txt_r1")
LEARNED = 0.5  # a run has learned the relations once its group score exceeds this
CURVE, DONE, SITTINGS = "curve.json", "run_time.json", "sittings.jsonl"


def twin_outcomes(path, groups_path):
    """winoground_outcomes() of a score_matrix.pt on the groups file's twins."""
    saved = torch.load(path, weights_only=True)
    return winoground_outcomes(saved["scores"], *group_indices(groups_path, saved["txt_ids"], saved["img_ids"]))


def summary_of(outcomes, rows=None):
    return winoground_summary(outcomes if rows is None else {k: v[rows] for k, v in outcomes.items()})


def paired_bootstrap(runs, other_runs, n_boot=2000, seed=0):
    """The mean over seeds of a twin metric of ``runs`` minus that of ``other_runs`` (lists of
    winoground_outcomes() on the same twin groups, one per training seed, in the same seed
    order): {metric: {diff, ci95, p, per_seed}}. Each resample draws seeds (paired: the same
    seeds for both) and twin groups with replacement, so the interval covers both the
    training's variation from seed to seed and the test set's sampling."""
    g = torch.Generator().manual_seed(seed)
    n_seeds, n_groups = len(runs), len(runs[0]["text"])
    seed_draws = torch.randint(n_seeds, (n_boot, n_seeds), generator=g)
    group_draws = torch.randint(n_groups, (n_boot, n_groups), generator=g)
    out = {}
    for metric in TWIN_METRICS:
        def diffs(rows=None):
            return np.array([summary_of(a, rows)[metric] - summary_of(b, rows)[metric]
                             for a, b in zip(runs, other_runs)])

        boot = torch.tensor([diffs(rows)[seeds.numpy()].mean() for seeds, rows in zip(seed_draws, group_draws)],
                            dtype=torch.float64)
        per_seed = diffs()
        out[metric] = {"diff": float(per_seed.mean()), "ci95": percentile_interval(boot),
                       "p": paired_p_value(boot), "per_seed": per_seed.tolist()}
    return out


def planned_runs(variants, seeds, primary_seeds):
    """[(variant, seed)] in the order they run: seed by seed, every variant of a seed
    together, so that a comparison stopped on the way has balanced arms."""
    plan = [(name, s) for s in seeds for name in variants]
    plan += [(name, s) for s in primary_seeds if s not in seeds for name in variants if name in (FAIR, PRIMARY)]
    return plan


def run_folder(output, name, seed):
    return join(output, f"{VARIANTS[name][0]}-seed{seed}")


def is_finished(out):
    return exists(join(out, DONE))


def call(args, what, env=None):
    """Run a program of the repository; its failure ends the comparison with its last line."""
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=env or child_env())
    if res.returncode:
        raise SystemExit(f"demo_relations.py: error: {args[0]} failed for {what}: "
                         f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}")


def run_one(demo, out, variant_flags, seed, steps, eval_every, log):
    """Train (resuming what a stopped comparison left), score the twins at every kept
    checkpoint, evaluate and measure the ISD of the last one; skipped when done before."""
    if is_finished(out):
        return
    start = time.time()
    ckpt_dir = join(out, "train", "ckpt")
    last = join(ckpt_dir, f"model_step_{steps}.pt")
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1")
    config = join(demo, "train-itm-demo.json")
    test = {"txt_db": join(demo, "txt_db", "itm_demo_test.db"), "img_db": join(demo, "img_db", "demo")}
    model_config = join(ROOT, "config", "uniter-demo.json")
    split = ["--txt_db", test["txt_db"], "--img_db", test["img_db"], "--model_config", model_config]
    steps_flags = ["--num_train_steps", str(steps), "--valid_steps", str(steps), "--save_steps", str(eval_every)]

    if not exists(last):
        call(["train_itm_hard_negatives.py", "--config", config, "--output_dir", join(out, "train"), "--resume",
              "--seed", str(seed)] + steps_flags + variant_flags, out, env)
    if not exists(join(out, CURVE)):
        kept = sorted(glob.glob(join(ckpt_dir, "model_step_*.pt")),
                      key=lambda p: int(re.search(r"(\d+)\.pt$", p).group(1)))
        call(["scripts/group_scores.py", *split, "--groups", join(demo, "annotations", "groups_test.json"),
              "--checkpoints", *kept, "--output", join(out, CURVE)], out, env)
    for path in glob.glob(join(ckpt_dir, "*_[0-9]*.pt")):
        if int(re.search(r"(\d+)\.pt$", path).group(1)) != steps:
            os.remove(path)
    if not exists(join(out, "eval", "score_matrix.pt")):
        call(["inf_itm.py", *split, "--checkpoint", last, "--output_dir", join(out, "eval"), "--batch_size", "100",
              "--n_workers", "0", "--resume"], out, env)
    if not exists(join(out, "isd", "isd.json")):
        call(["scripts/isd.py", *split, "--checkpoint", last, "--output", join(out, "isd")], out, env)
    write_json(join(out, DONE), {"seconds": time.time() - start, "steps": steps, "eval_every": eval_every})
    log(f"done: {out} ({time.time() - start:.0f} s)")


def steps_to_learn(points):
    """(step, learned): the first point whose group score exceeds LEARNED, else the last
    point's step, censored."""
    for p in points:
        if p["group"] > LEARNED:
            return p["step"], True
    return points[-1]["step"], False


def curve_area(points):
    """Area under a group-score curve over its steps, divided by their range: the mean
    group score over training (trapezoids)."""
    steps = np.array([p["step"] for p in points], dtype=np.float64)
    group = np.array([p["group"] for p in points], dtype=np.float64)
    if len(steps) < 2:
        return float(group.mean())
    return float(((group[1:] + group[:-1]) / 2 * np.diff(steps)).sum() / (steps[-1] - steps[0]))


def measure(out, groups_path):
    """(twin outcomes of the last weights, the run's record)."""
    outcomes = twin_outcomes(join(out, "eval", "score_matrix.pt"), groups_path)
    with open(join(out, "eval", "scores.json")) as f:
        recall = json.load(f)
    with open(join(out, "isd", "isd.json")) as f:
        isd = json.load(f)
    with open(join(out, CURVE)) as f:
        points = [{k: p[k] for k in ("step",) + TWIN_METRICS} for p in json.load(f)["points"]]
    with open(join(out, DONE)) as f:
        seconds = json.load(f)["seconds"]
    last = max((k for k in isd if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    step, learned = steps_to_learn(points)
    return outcomes, {**summary_of(outcomes), "img_r1": recall["img_r1"], "txt_r1": recall["txt_r1"],
                      "isd_last_layer": isd[last], "curve": points, "steps_to_learn": step, "learned": learned,
                      "curve_area": curve_area(points), "seconds": seconds}


def area_difference(areas_a, areas_b, n_boot, seed=0):
    """Mean curve area of arm a minus arm b, with a 95% percentile interval of resamples
    that draw each arm's runs with replacement (the arms' seeds are not paired)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(areas_a), np.asarray(areas_b)
    boot = (a[rng.integers(len(a), size=(n_boot, len(a)))].mean(1)
            - b[rng.integers(len(b), size=(n_boot, len(b)))].mean(1))
    return {"diff": float(a.mean() - b.mean()), "ci95": percentile_interval(torch.from_numpy(boot)),
            "p": paired_p_value(torch.from_numpy(boot))}


def arm_tests(runs_a, runs_b, n_boot):
    """The declared tests of arm a against arm b (lists of run records)."""
    times = {k: ([r["steps_to_learn"] for r in runs], [r["learned"] for r in runs])
             for k, runs in (("a", runs_a), ("b", runs_b))}
    learned_a, learned_b = sum(times["a"][1]), sum(times["b"][1])
    return {"logrank": logrank(*times["a"], *times["b"]),
            "fisher": {"learned_a": learned_a, "n_a": len(runs_a), "learned_b": learned_b, "n_b": len(runs_b),
                       "p": fisher_exact(learned_a, len(runs_a), learned_b, len(runs_b))},
            "curve_area": area_difference([r["curve_area"] for r in runs_a], [r["curve_area"] for r in runs_b],
                                          n_boot)}


def design_power(n_primary, n_fair, fair_share, events):
    """The smallest differences the primary comparison detects with probability 0.8 at
    alpha 0.05: in share of runs learned (Fisher, exact, against the fair baseline's
    observed share) and as a hazard ratio (log-rank, Schoenfeld, from the events seen)."""
    return {"alpha": 0.05, "power": 0.8, "fair_baseline_share_learned": fair_share,
            "fisher_smallest_share_learned": smallest_detectable_share(n_primary, n_fair, fair_share),
            "logrank_events": events, "logrank_smallest_hazard_ratio": logrank_detectable_hazard_ratio(events)}


def mean_curve(runs):
    """(steps, mean group score, 95% band) over runs that share their evaluation steps."""
    steps = [p["step"] for p in runs[0]["curve"]]
    group = np.array([[p["group"] for p in r["curve"]] for r in runs], dtype=np.float64)
    bands = [summarise(group[:, j])["ci95"] or [group[0, j]] * 2 for j in range(len(steps))]
    return steps, group.mean(0), np.array(bands)


def draw(path, by_arm):
    """relations.png: mean group score per arm with its 95% band and every run (left);
    Kaplan-Meier curves of steps to learn (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, runs) in enumerate(by_arm.items()):
        color = f"C{k}"
        for r in runs:
            left.plot([p["step"] for p in r["curve"]], [100 * p["group"] for p in r["curve"]], color=color,
                      lw=0.5, alpha=0.35)
        steps, mean, band = mean_curve(runs)
        left.plot(steps, 100 * mean, color=color, lw=2, label=f"{name} ({len(runs)} runs)")
        left.fill_between(steps, 100 * band[:, 0], 100 * band[:, 1], color=color, alpha=0.2)
        km = kaplan_meier([r["steps_to_learn"] for r in runs], [r["learned"] for r in runs])
        km.append((max(r["steps_to_learn"] for r in runs), km[-1][1]))
        right.step([t for t, _ in km], [100 * s for _, s in km], where="post", color=color, lw=2, label=name)
    left.axhline(100 * LEARNED, color="grey", lw=0.8, ls="--")
    left.set(xlabel="training step", ylabel="Winoground group score (test twins)", ylim=(0, 100),
             title="group score over training: mean, 95% band, runs")
    right.set(xlabel="training step", ylabel=f"runs not yet past group {100 * LEARNED:.0f} (%)", ylim=(0, 102),
              title="steps to learn (Kaplan-Meier)")
    left.legend(fontsize=8, loc="upper left")
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)


def record_sitting(output, start, runs_done):
    """One line of OUTPUT/sittings.jsonl per call that ran runs: when, how long, how many."""
    os.makedirs(output, exist_ok=True)
    with open(join(output, SITTINGS), "a") as f:
        f.write(json.dumps({"start": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)),
                            "seconds": time.time() - start, "runs_done": runs_done}) + "\n")


def sittings(output):
    path = join(output, SITTINGS)
    if not exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pooled_tables(output, groups_path, finished):
    """OUTPUT/pooled.{md,tex,csv,json}: scripts/compare_runs.py on the last weights' score
    matrices, runs pooled per arm (differences paired by seed)."""
    arms = []
    for name in VARIANTS:
        matrices = [join(run_folder(output, n, s), "eval", "score_matrix.pt") for n, s in finished if n == name]
        if matrices:
            arms += ["--arm", name, *matrices]
    call(["scripts/compare_runs.py", *arms, "--groups", groups_path, "--output", join(output, "pooled")], output)


def report(output, groups_path, plan, n_boot):
    """relations.json, relations.png and pooled.* from the finished runs of ``plan``;
    prints the tables."""
    finished = [(name, seed) for name, seed in plan if is_finished(run_folder(output, name, seed))]
    outcomes, records = {}, {}
    for name, seed in finished:
        outcomes[name, seed], records[name, seed] = measure(run_folder(output, name, seed), groups_path)
    by_arm = {name: [records[n, s] for n, s in finished if n == name] for name in VARIANTS}
    by_arm = {name: runs for name, runs in by_arm.items() if runs}
    seeds_of = {name: [s for n, s in finished if n == name] for name in by_arm}
    results = {"runs": {f"{n} seed {s}": r for (n, s), r in records.items()}, "groups_file": groups_path,
               "learned": f"group score > {100 * LEARNED:.0f} at an evaluation", "variants": {}, "tests": {}}
    for name, runs in by_arm.items():
        v = {m: summarise([r[m] for r in runs]) for m in METRICS + ("curve_area",)}
        v.update({"seeds": seeds_of[name], "learned": sum(r["learned"] for r in runs), "n": len(runs),
                  "isd_last_layer": {k: float(np.mean([r["isd_last_layer"][k] for r in runs]))
                                     for k in runs[0]["isd_last_layer"]}})
        results["variants"][name] = v
    if FAIR in by_arm:
        for name in by_arm:
            if name != FAIR:
                results["tests"][f"{name} vs {FAIR}"] = arm_tests(by_arm[name], by_arm[FAIR], n_boot)
                common = [s for s in seeds_of[name] if s in seeds_of[FAIR]]
                if len(common) >= 2:
                    results["tests"][f"{name} vs {FAIR}"]["end_points_paired"] = paired_bootstrap(
                        [outcomes[name, s] for s in common], [outcomes[FAIR, s] for s in common], n_boot)
        if PRIMARY in by_arm:
            events = sum(r["learned"] for r in by_arm[PRIMARY] + by_arm[FAIR])
            results["power"] = design_power(len(by_arm[PRIMARY]), len(by_arm[FAIR]),
                                            results["variants"][FAIR]["learned"] / len(by_arm[FAIR]), events)
    seconds = [r["seconds"] for r in records.values()]
    done = sittings(output)
    results["wall_time"] = {"runs": len(seconds), "run_seconds_total": float(sum(seconds)),
                            "run_seconds_mean": float(np.mean(seconds)) if seconds else None,
                            "sittings": done, "wall_seconds_total": float(sum(d["seconds"] for d in done))}
    write_json(join(output, "relations.json"), results, indent=2, default=float)
    if by_arm:
        draw(join(output, "relations.png"), by_arm)
        pooled_tables(output, groups_path, finished)
    tables = tables_markdown(results)
    atomic_write(join(output, "relations.md"), lambda f: f.write(tables.encode()))
    print(tables, end="")
    return results


def median_steps(runs):
    """The Kaplan-Meier median of steps to learn, None when fewer than half the runs learned."""
    km = kaplan_meier([r["steps_to_learn"] for r in runs], [r["learned"] for r in runs])
    return next((t for t, share in km if share <= 0.5), None)


def _pct(summary):
    return f"{100 * summary['mean']:.1f}"


def tables_markdown(results):
    """The comparison's tables (markdown): per arm, then each arm against the fair baseline."""
    lines = ["| arm | runs | learned by the last step | median steps to learn | group score, last | "
             "own-vs-twin, last | curve area | image R@1 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in results["variants"].items():
        runs = [r for k, r in results["runs"].items() if k.rsplit(" seed ", 1)[0] == name]
        median = median_steps(runs)
        group = [100 * r["group"] for r in runs]
        lines.append(f"| {name} | {v['n']} | {v['learned']} of {v['n']} | "
                     f"{'not reached' if median is None else median} | {_pct(v['group'])} "
                     f"[{min(group):.1f}, {max(group):.1f}] | {_pct(v['own_vs_twin'])} | {_pct(v['curve_area'])} | "
                     f"{_pct(v['img_r1'])} |")
    lines += ["", "| against the fair baseline | log-rank (primary) | Fisher, learned by the last step | "
              "curve area difference [95% interval] |", "| --- | --- | --- | --- |"]
    for name, t in results["tests"].items():
        lr, fi, area = t["logrank"], t["fisher"], t["curve_area"]
        p_lr = "no run learned" if lr["p"] is None else f"chi2 {lr['chi2']:.2f}, p = {lr['p']:.3f}"
        lines.append(f"| {name.split(' vs ')[0]} | {p_lr} (learned {lr['observed_a']:.0f}, "
                     f"{lr['expected_a']:.1f} expected) | {fi['learned_a']}/{fi['n_a']} vs {fi['learned_b']}/"
                     f"{fi['n_b']}, p = {fi['p']:.3f} | {100 * area['diff']:+.1f} "
                     f"[{100 * area['ci95'][0]:+.1f}, {100 * area['ci95'][1]:+.1f}] |")
    if "power" in results:
        pw = results["power"]
        share, hr = pw["fisher_smallest_share_learned"], pw["logrank_smallest_hazard_ratio"]
        lines += ["", f"Power 0.8 at alpha 0.05, these arm sizes: Fisher's test finds IAIS singular learning in "
                      f"{'no share of runs' if share is None else f'{100 * share:.0f}% of runs'} against the fair "
                      f"baseline's {100 * pw['fair_baseline_share_learned']:.0f}%; the log-rank test, with "
                      f"{pw['logrank_events']} learned runs, a hazard ratio of {'-' if hr is None else f'{hr:.1f}'}."]
    wt = results["wall_time"]
    lines += ["", f"Wall time: {wt['runs']} runs, {wt['run_seconds_total'] / 3600:.2f} h of run time in all "
                  f"(mean {0 if not wt['runs'] else wt['run_seconds_mean'] / 60:.1f} min a run), "
                  f"{wt['wall_seconds_total'] / 3600:.2f} h over {len(wt['sittings'])} sitting(s)."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="demo", help="demo data folder (make_demo_data.py --output)")
    p.add_argument("--output", default="demo/relations", help="runs, relations.json, relations.png")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="training seeds of every variant")
    p.add_argument("--primary_seeds", type=int, nargs="*", default=list(range(8, 16)),
                   help="more seeds of the fair baseline and IAIS singular (the primary test's arms)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to run (default all: {', '.join(VARIANTS)})")
    p.add_argument("--steps", type=int, default=6000, help="training steps per run")
    p.add_argument("--eval_every", type=int, default=250, help="steps between evaluations of the test twins")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the bootstrap intervals")
    p.add_argument("--report_only", action="store_true", help="report on the finished runs, run none")
    opts = p.parse_args()
    for flag in ("steps", "eval_every", "parallel", "bootstrap"):
        if getattr(opts, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    groups_path = join(opts.demo, "annotations", "groups_test.json")
    if not exists(groups_path):
        raise SystemExit(f"demo_relations.py: error: {groups_path} not found; build the demo data with "
                         f"scripts/make_demo_data.py --output {opts.demo}")
    start = time.time()
    plan = planned_runs(opts.variants, opts.seeds, opts.primary_seeds)
    todo = [(name, seed) for name, seed in plan if not is_finished(run_folder(opts.output, name, seed))]
    if todo and not opts.report_only:
        try:
            with ThreadPoolExecutor(opts.parallel) as pool:
                for f in [pool.submit(run_one, opts.demo, run_folder(opts.output, name, seed), VARIANTS[name][1],
                                      seed, opts.steps, opts.eval_every, print) for name, seed in todo]:
                    f.result()
        finally:
            record_sitting(opts.output, start, sum(is_finished(run_folder(opts.output, n, s)) for n, s in todo))
    report(opts.output, groups_path, plan, opts.bootstrap)


if __name__ == "__main__":
    main()
