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
continues where it stopped (SIGINT or SIGTERM stops each run in progress at a checkpoint it
resumes from, exit status 130 or 143); ``--report_only`` reports on the finished runs without
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
import time
from concurrent.futures import ThreadPoolExecutor
from os.path import exists, join

import numpy as np

from scripts.relations_stats import (LEARNED, METRICS, TWIN_METRICS, arm_tests, curve_area, design_power, draw,
                                     paired_bootstrap, steps_to_learn, summary_of, tables_markdown, twin_outcomes)
from scripts.child_runs import ChildRuns, Stopped
from scripts.repo import ROOT, child_env
from utils.checkpoint import step_of
from utils.errors import load_json
from utils.outputs import atomic_write, write_json
from utils.pooled_stats import summarise

# name: (folder, training flags)
VARIANTS = {"baseline (original masks)": ("baseline-original-masks", []),
            "baseline (fixed masks)": ("baseline-fixed-masks", ["--fix_image_side_masks"]),
            "IAIS singular": ("iais-singular", ["--IAIS", "singular"]),
            "IAIS distributed": ("iais-distributed", ["--IAIS", "distributed"])}
FAIR, PRIMARY = "baseline (fixed masks)", "IAIS singular"
CURVE, DONE, SITTINGS = "curve.json", "run_time.json", "sittings.jsonl"


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


CHILDREN = ChildRuns()  # what SIGINT and SIGTERM stop together with this process


def call(args, what, env=None):
    """Run a program of the repository; its failure ends the comparison with its last line."""
    status, _, err = CHILDREN.run([sys.executable] + args, cwd=ROOT, env=env or child_env())
    if status and CHILDREN.stopped_by is None:
        raise SystemExit(f"demo_relations.py: error: {args[0]} failed for {what}: "
                         f"{(err.strip().splitlines() or ['no output'])[-1]}")
    if status:
        raise Stopped(CHILDREN.stopped_by)


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
        # a run stopped by a signal also left a checkpoint at the step it stopped: off the grid
        on_grid = [step for step in map(step_of, glob.glob(join(ckpt_dir, "model_step_*.pt")))
                   if step % eval_every == 0 or step == steps]
        call(["scripts/group_scores.py", *split, "--groups", join(demo, "annotations", "groups_test.json"),
              "--checkpoints", *(join(ckpt_dir, f"model_step_{step}.pt") for step in sorted(on_grid)),
              "--output", join(out, CURVE)], out, env)
    for kind in ("model_step", "train_state"):
        for path in glob.glob(join(ckpt_dir, f"{kind}_*.pt")):
            if step_of(path, kind) not in (None, steps):
                os.remove(path)
    if not exists(join(out, "eval", "score_matrix.pt")):
        call(["inf_itm.py", *split, "--checkpoint", last, "--output_dir", join(out, "eval"), "--batch_size", "100",
              "--n_workers", "0", "--resume"], out, env)
    if not exists(join(out, "isd", "isd.json")):
        call(["scripts/isd.py", *split, "--checkpoint", last, "--output", join(out, "isd")], out, env)
    write_json(join(out, DONE), {"seconds": time.time() - start, "steps": steps, "eval_every": eval_every})
    log(f"done: {out} ({time.time() - start:.0f} s)")


def measure(out, groups_path):
    """(twin outcomes of the last weights, the run's record)."""
    outcomes = twin_outcomes(join(out, "eval", "score_matrix.pt"), groups_path)
    recall = load_json(join(out, "eval", "scores.json"), "scores")
    isd = load_json(join(out, "isd", "isd.json"), "ISD")
    points = [{k: p[k] for k in ("step",) + TWIN_METRICS} for p in load_json(join(out, CURVE), "curve")["points"]]
    seconds = load_json(join(out, DONE), "run time")["seconds"]
    last = max((k for k in isd if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    step, learned = steps_to_learn(points)
    return outcomes, {**summary_of(outcomes), "img_r1": recall["img_r1"], "txt_r1": recall["txt_r1"],
                      "isd_last_layer": isd[last], "curve": points, "steps_to_learn": step, "learned": learned,
                      "curve_area": curve_area(points), "seconds": seconds}


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
    for name in sorted(VARIANTS, key=lambda n: n != FAIR):  # compare_runs.py differences are to the first arm
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
    try:
        with CHILDREN:
            compare(opts, groups_path)
    except Stopped as stop:
        print(f"demo_relations.py: {stop}; each run in progress stopped at a checkpoint, and the same command "
              f"continues where it stopped", file=sys.stderr)
        sys.exit(stop.exit_status)


def compare(opts, groups_path):
    start = time.time()
    plan = planned_runs(opts.variants, opts.seeds, opts.primary_seeds)
    todo = [(name, seed) for name, seed in plan if not is_finished(run_folder(opts.output, name, seed))]
    if todo and not opts.report_only:
        pool = ThreadPoolExecutor(opts.parallel)
        try:
            for f in [pool.submit(run_one, opts.demo, run_folder(opts.output, name, seed), VARIANTS[name][1],
                                  seed, opts.steps, opts.eval_every, print) for name, seed in todo]:
                f.result()
        finally:
            # a failed run or a signal ends the sitting: the runs not yet started must not start
            pool.shutdown(wait=True, cancel_futures=True)
            record_sitting(opts.output, start, sum(is_finished(run_folder(opts.output, n, s)) for n, s in todo))
    report(opts.output, groups_path, plan, opts.bootstrap)


if __name__ == "__main__":
    main()
