"""The relations comparison's statistics over run records (scripts/demo_relations.py):
steps to learn, the area under a group-score curve, the declared tests of one arm against
another, the design's power, the tables and the picture.

A run record holds its end points (twin metrics, R@1), its ``curve`` (points with a
``step`` and the twin metrics), ``steps_to_learn``, ``learned`` and ``curve_area``.
"""
import numpy as np
import torch

from scripts.retrieval_metrics import load_score_file
from utils.outputs import atomic_write
from utils.pooled_stats import summarise
from utils.retrieval_metrics import (group_indices, paired_p_value, percentile_interval, winoground_outcomes,
                                     winoground_summary)
from utils.survival import (fisher_exact, kaplan_meier, logrank, logrank_detectable_hazard_ratio,
                            smallest_detectable_share)

TWIN_METRICS = ("own_vs_twin", "text", "image", "group")
METRICS = TWIN_METRICS + ("img_r1", "txt_r1")
LEARNED = 0.5  # a run has learned the relations once its group score exceeds this


def twin_outcomes(path, groups_path):
    """winoground_outcomes() of a score_matrix.pt (read and checked as every score file is)
    on the groups file's twins."""
    scores, txt_ids, img_ids, _ = load_score_file(path)
    return winoground_outcomes(scores, *group_indices(groups_path, txt_ids, img_ids))


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
