"""Does IAIS help a model learn relations? The demo trained four ways, over seeds, scored on
the test split's twins.

    python scripts/demo_relations.py --demo demo --output demo/relations --seeds 0 1 2 [--parallel 2]

Variants: the baseline as the original trains it (image-side masks of the original), the
baseline with the masks of its padded layout (--fix_image_side_masks), IAIS singular and
IAIS distributed (whose image-side batches have correct masks anyway). Each run trains
the demo config (twins among the negatives) with the given seed, is evaluated with
inf_itm.py, and measured on the test twins: own-vs-twin accuracy (a caption scores its own
image above its twin), Winoground text/image/group scores, R@K, and the ISD of
scripts/isd.py at the last layer. Writes OUTPUT/relations.json (every run, the mean and
spread per variant, and paired bootstrap comparisons of IAIS against the fair baseline)
and prints a table.
"""
import utils.threads  # noqa: F401  (first: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from os.path import exists, join

import numpy as np
import torch

from scripts.repo import ROOT, child_env
from utils.outputs import write_json
from utils.retrieval_metrics import (group_indices, paired_p_value, percentile_interval,
                                     winoground_outcomes, winoground_summary)

# name: (folder, training flags)
VARIANTS = {"baseline (original masks)": ("baseline-original-masks", []),
            "baseline (fixed masks)": ("baseline-fixed-masks", ["--fix_image_side_masks"]),
            "IAIS singular": ("iais-singular", ["--IAIS", "singular"]),
            "IAIS distributed": ("iais-distributed", ["--IAIS", "distributed"])}
TWIN_METRICS = ("own_vs_twin", "text", "image", "group")
METRICS = TWIN_METRICS + ("img_r1", "txt_r1")


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


def run_one(demo, out, variant_flags, seed, steps, log):
    """Train, evaluate and measure the ISD of one (variant, seed); skipped when done before."""
    ckpt = join(out, "train", "ckpt", f"model_step_{steps}.pt")
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1")
    config = join(demo, "train-itm-demo.json")
    test = {"txt_db": join(demo, "txt_db", "itm_demo_test.db"), "img_db": join(demo, "img_db", "demo")}
    commands = []
    if not exists(ckpt):
        commands.append(["train_itm_hard_negatives.py", "--config", config, "--output_dir", join(out, "train"),
                         "--seed", str(seed), "--num_train_steps", str(steps), "--valid_steps", str(steps)]
                        + variant_flags)
    if not exists(join(out, "eval", "score_matrix.pt")):
        commands.append(["inf_itm.py", "--txt_db", test["txt_db"], "--img_db", test["img_db"], "--checkpoint", ckpt,
                         "--model_config", join(ROOT, "config", "uniter-demo.json"), "--output_dir",
                         join(out, "eval"), "--batch_size", "100", "--n_workers", "0"])
    if not exists(join(out, "isd", "isd.json")):
        commands.append(["scripts/isd.py", "--txt_db", test["txt_db"], "--img_db", test["img_db"], "--checkpoint",
                         ckpt, "--model_config", join(ROOT, "config", "uniter-demo.json"), "--output",
                         join(out, "isd")])
    for args in commands:
        res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(f"demo_relations.py: error: {args[0]} failed for {out}: "
                             f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}")
    log(f"done: {out}")


def measure(out, groups_path):
    outcomes = twin_outcomes(join(out, "eval", "score_matrix.pt"), groups_path)
    with open(join(out, "eval", "scores.json")) as f:
        recall = json.load(f)
    with open(join(out, "isd", "isd.json")) as f:
        isd = json.load(f)
    last = max((k for k in isd if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    return outcomes, {**summary_of(outcomes), "img_r1": recall["img_r1"], "txt_r1": recall["txt_r1"],
                      "isd_last_layer": isd[last]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="demo", help="demo data folder (make_demo_data.py --output)")
    p.add_argument("--output", default="demo/relations", help="runs, relations.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=6000, help="training steps per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one CPU thread each)")
    opts = p.parse_args()
    groups_path = join(opts.demo, "annotations", "groups_test.json")
    if not exists(groups_path):
        raise SystemExit(f"demo_relations.py: error: {groups_path} not found; build the demo data with "
                         f"scripts/make_demo_data.py --output {opts.demo}")
    runs = {(name, seed): join(opts.output, f"{folder}-seed{seed}")
            for name, (folder, _) in VARIANTS.items() for seed in opts.seeds}
    with ThreadPoolExecutor(opts.parallel) as pool:
        for f in [pool.submit(run_one, opts.demo, out, VARIANTS[name][1], seed, opts.steps, print)
                  for (name, seed), out in runs.items()]:
            f.result()
    results, outcomes = {"runs": {}, "variants": {}, "steps": opts.steps, "seeds": opts.seeds,
                         "groups_file": groups_path}, {}
    for (name, seed), out in runs.items():
        outcomes[name, seed], results["runs"][f"{name} seed {seed}"] = measure(out, groups_path)
    for name in VARIANTS:
        per_seed = [results["runs"][f"{name} seed {s}"] for s in opts.seeds]
        results["variants"][name] = {m: {"mean": float(np.mean([r[m] for r in per_seed])),
                                         "min": float(np.min([r[m] for r in per_seed])),
                                         "max": float(np.max([r[m] for r in per_seed]))} for m in METRICS}
        results["variants"][name]["isd_last_layer"] = {
            k: float(np.mean([r["isd_last_layer"][k] for r in per_seed])) for k in per_seed[0]["isd_last_layer"]}
    fair = [outcomes["baseline (fixed masks)", s] for s in opts.seeds]
    results["iais_vs_fair_baseline"] = {
        name: paired_bootstrap([outcomes[name, s] for s in opts.seeds], fair)
        for name in ("IAIS singular", "IAIS distributed", "baseline (original masks)")}
    write_json(join(opts.output, "relations.json"), results, indent=2, default=float)
    print(f"{'variant':28s} " + " ".join(f"{m:>12s}" for m in METRICS))
    for name, v in results["variants"].items():
        print(f"{name:28s} " + " ".join(f"{100 * v[m]['mean']:6.1f}±{50 * (v[m]['max'] - v[m]['min']):4.1f}"
                                        for m in METRICS))
    for name, cmp in results["iais_vs_fair_baseline"].items():
        g = cmp["group"]
        print(f"{name} - fair baseline, Winoground group: {100 * g['diff']:+.1f} "
              f"(95% CI [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}], p = {g['p']:.3f}; "
              f"per seed {', '.join(f'{100 * d:+.1f}' for d in g['per_seed'])})")


if __name__ == "__main__":
    main()
