"""Compare arms of several training runs each (seeds pooled): mean, spread and paired differences.

    python scripts/compare_runs.py --arm baseline runs/base-s1 runs/base-s2 runs/base-s3 \\
        --arm IAIS runs/iais-s1 runs/iais-s2 runs/iais-s3 [--groups GROUPS.json] \\
        [--output tables/iais] [--bootstrap 1000] [--seed 42] [--original_counting 1]

An entry is a training output_dir, a folder holding one (as train/, the layout of
scripts/demo_relations.py), an inf_itm.py output_dir, or a score_matrix.pt. A folder's score
matrix is its score_matrix.pt or eval/score_matrix.pt (inf_itm.py --output_dir RUN/eval);
without one, its metrics are those of results_test/results_{N}.json of the last step N.
A run's seed is the "seed" of log/hps.json (for a score file: of the run its config.json's
train_config or checkpoint names).

Per arm and metric (every R@K of utils/retrieval_metrics.py, rsum, and with --groups the
Winoground text, image, group scores and own-vs-twin): n, the mean, the sample standard
deviation and the 95% Student-t interval over runs. Every later arm minus the first, on
runs paired by seed (by position when a seed is unknown): the mean per-seed difference, a
95% bootstrap interval that resamples the seeds and, when every run of both arms has a
score matrix, the queries (twin groups) within each resampled seed, the same queries for
both arms (otherwise the seeds only), and the exact two-sided sign-flip p-value over seeds.
Prints a Markdown table; --output PREFIX writes PREFIX.md, .tex, .csv and .json.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
import re
from dataclasses import dataclass
from os.path import dirname, isdir, isfile, join

import numpy as np
import torch

from data import DataError
from engine.output_dir import RunFolders
from scripts.compare_tables import OUTPUT_KINDS, print_and_write
from scripts.retrieval_metrics import aligned_to, load_score_file
from utils.cli import run
from utils.config import NON_NEGATIVE, ConfigError, add_counting_arg, load_json, make_parser
from utils.pooled_stats import (resampled_means, seed_draws, seeds_bootstrap, sign_flip_p, summarise,
                                two_level_bootstrap)
from utils.retrieval_metrics import (RECALL_KEYS, bootstrap_recalls, counting_name, group_indices,
                                     metrics_from_ranks, percentile_interval, query_hits, query_ranks,
                                     winoground_outcomes, winoground_summary)

TWIN_KEYS = ("text", "image", "group", "own_vs_twin")
RESULTS_FILE = re.compile(r"results_(\d+)\.json")


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
      help="an arm's name and its runs (training output_dirs or score_matrix.pt files); repeat per arm")
    a("--groups", default=None, help="Winoground-style groups JSON (needs score matrices)")
    a("--output", default=None, help="PREFIX: write PREFIX.md, PREFIX.tex, PREFIX.csv and PREFIX.json")
    a("--bootstrap", type=int, default=1000, valid=NON_NEGATIVE, help="resamples of the intervals of differences")
    a("--seed", type=int, default=42, help="seed of the resampling")
    add_counting_arg(p)
    return p


@dataclass
class Entry:
    given: str
    matrix: str = None    # score_matrix.pt, if any
    results: str = None   # results_test/results_{N}.json of the last step, if any
    hps: str = None       # the training options, whence the seed


@dataclass
class Run:
    entry: Entry
    seed: int
    metrics: dict
    hits: dict = None     # query_hits() in the reference matrix's query order
    twins: np.ndarray = None  # [n_groups, len(TWIN_KEYS)] per-group outcomes

    @property
    def source(self):
        return self.entry.matrix if self.hits is not None else self.entry.results


@dataclass
class Arm:
    name: str
    runs: list


def training_folder(folder):
    for candidate in (folder, join(folder, "train")):
        if isdir(join(candidate, "log")) or isdir(RunFolders(candidate).results):
            return candidate
    return None


def last_results(train):
    results = RunFolders(train).results
    steps = [(int(m.group(1)), name) for name in (os.listdir(results) if isdir(results) else [])
             if (m := RESULTS_FILE.fullmatch(name))]
    return join(results, max(steps)[1]) if steps else None


def options_of_scores(matrix):
    """hps.json of the training run whose checkpoint the score file's config.json names."""
    config = join(dirname(matrix), "config.json")
    settings = load_json(config, "evaluation options") if isfile(config) else None
    if not isinstance(settings, dict):
        return None
    checkpoint = settings.get("checkpoint")
    candidates = [settings.get("train_config")]
    if isinstance(checkpoint, str):
        candidates.append(join(dirname(dirname(checkpoint)), "log", "hps.json"))
    return next((c for c in candidates if isinstance(c, str) and isfile(c)), None)


def resolve_entry(arm, given):
    if not os.path.exists(given):
        raise ConfigError(f"--arm {arm}: {given} not found; give training output_dirs or score_matrix.pt files")
    if isfile(given):
        return Entry(given, matrix=given, hps=options_of_scores(given))
    train = training_folder(given)
    matrix = next((m for m in (join(given, "score_matrix.pt"), join(given, "eval", "score_matrix.pt"))
                   if isfile(m)), None)
    results = last_results(train) if train else None
    if matrix is None and results is None:
        raise DataError(f"--arm {arm}: {given} holds no test results (results_test/results_N.json) and no "
                        f"score matrix (score_matrix.pt, eval/score_matrix.pt); let its training finish or "
                        f"evaluate it with inf_itm.py --output_dir {join(given, 'eval')}")
    hps = join(train, "log", "hps.json") if train else None
    hps = hps if hps and isfile(hps) else (options_of_scores(matrix) if matrix else None)
    return Entry(given, matrix=matrix, results=results, hps=hps)


def resolve_arms(opts):
    """{arm name: [Entry]}: every flag checked and every path found; no score matrix loaded yet."""
    if not opts.arm:
        raise ConfigError("give at least one --arm NAME RUN [RUN ...]")
    arms = {}
    for name, *entries in opts.arm:
        if name in arms:
            raise ConfigError(f"--arm {name} is given twice; give each arm its own name")
        if not entries:
            raise ConfigError(f"--arm {name} has no runs; give its training output_dirs or score_matrix.pt "
                              f"files after the name")
        twice = next((e for e in entries if entries.count(e) > 1), None)
        if twice:
            raise ConfigError(f"--arm {name}: {twice} is given twice; give each run once")
        arms[name] = [resolve_entry(name, e) for e in entries]
    if opts.groups and not os.path.isfile(opts.groups):
        raise ConfigError(f"--groups {opts.groups} not found; give a JSON list of twin groups")
    return arms


def output_paths(opts):
    prefix = opts.output
    if prefix and prefix.endswith(tuple(f".{kind}" for kind in OUTPUT_KINDS)):
        prefix = prefix.rsplit(".", 1)[0]
    return {kind: f"{prefix}.{kind}" for kind in OUTPUT_KINDS} if prefix else {}


def refuse_overwriting_inputs(outputs, arms, opts):
    inputs = [opts.groups] + [p for entries in arms.values() for e in entries
                              for p in (e.given, e.matrix, e.results, e.hps)]
    inputs = {os.path.realpath(p): p for p in inputs if p}
    for path in outputs.values():
        if os.path.realpath(path) in inputs:
            raise ConfigError(f"--output {opts.output} would overwrite the input {inputs[os.path.realpath(path)]}; "
                              f"choose another PREFIX")


def seed_of(entry):
    hps = load_json(entry.hps, "training options") if entry.hps else None
    seed = hps.get("seed") if isinstance(hps, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def results_metrics(path, counting):
    """R@K and rsum of a run's test results JSON, counted as ``counting`` asks."""
    data = load_json(path, "test results")
    if not isinstance(data, dict) or data.get("counting") not in ("textbook", "original"):
        raise DataError(f"{path} does not say how its recall was counted ('counting'); evaluate the checkpoint "
                        f"with inf_itm.py and give its score_matrix.pt")
    bad = [k for k in RECALL_KEYS if not isinstance(data.get(k), (int, float)) or isinstance(data.get(k), bool)
           or not np.isfinite(data[k])]
    if bad:
        raise DataError(f"{path}: {', '.join(bad)} missing or not a number; give the results_N.json training wrote")
    if data["counting"] != counting:
        flag = int(data["counting"] == "original")
        raise DataError(f"{path} counts recall the {data['counting']} way; pass --original_counting {flag} "
                        f"(every run of a comparison counted alike) or evaluate it again with inf_itm.py")
    metrics = {k: float(data[k]) for k in RECALL_KEYS}
    return {**metrics, "rsum": sum(metrics.values())}


def twin_values(outcomes):
    """Per twin group, the values whose means are winoground_summary()'s scores: [n_groups, 4]."""
    own = (outcomes["own_0"].double() + outcomes["own_1"].double()) / 2
    text, image = outcomes["text"].double(), outcomes["image"].double()
    return torch.stack([text, image, text * image, own], 1).numpy()


def matrix_run(entry, scores, gt_img, original_counting, groups):
    ranks = query_ranks(scores, gt_img)
    metrics = metrics_from_ranks(*ranks, original_counting)
    run_ = Run(entry, seed_of(entry), {k: metrics[k] for k in RECALL_KEYS + ("rsum",)},
               hits=query_hits(*ranks, original_counting))
    if groups is not None:
        outcomes = winoground_outcomes(scores, *groups)
        summary = winoground_summary(outcomes)
        run_.metrics.update({k: summary[k] for k in TWIN_KEYS})
        run_.twins = twin_values(outcomes)
    return run_


def load_arms(arms, opts):
    """[Arm]: every score matrix aligned to the first one's query order (same split checked)."""
    matrices = [e for entries in arms.values() for e in entries if e.matrix]
    if opts.groups and len(matrices) < sum(map(len, arms.values())):
        lacking = next(e for entries in arms.values() for e in entries if not e.matrix)
        raise DataError(f"--groups needs a score matrix of every run; {lacking.given} has only "
                        f"{lacking.results}: evaluate it with inf_itm.py --output_dir {join(lacking.given, 'eval')}")
    reference = groups = None
    if matrices:
        reference = (matrices[0].matrix,) + load_score_file(matrices[0].matrix)
        if opts.groups:
            groups = group_indices(opts.groups, reference[2], reference[3])
    counting = counting_name(opts.original_counting)
    loaded = []
    for name, entries in arms.items():
        runs = []
        for e in entries:
            if e.matrix:
                ref_path, ref_scores, txt_ids, img_ids, gt_img = reference
                scores = ref_scores if e is matrices[0] else aligned_to(ref_path, e.matrix, txt_ids, img_ids, gt_img)
                runs.append(matrix_run(e, scores, gt_img, bool(opts.original_counting), groups))
            else:
                runs.append(Run(e, seed_of(e), results_metrics(e.results, counting)))
        loaded.append(Arm(name, runs))
    return loaded


def metric_keys(opts):
    return RECALL_KEYS + ("rsum",) + (TWIN_KEYS if opts.groups else ())


def paired_runs(base, other):
    """([(run of base, run of other)], how they pair): by seed when every run's seed is
    known and unique within its arm (seeds of one arm only are left out), else by position."""
    seeds = [[r.seed for r in arm.runs] for arm in (base, other)]
    if all(s is not None for arm in seeds for s in arm) and all(len(set(s)) == len(s) for s in seeds):
        common = sorted(set(seeds[0]) & set(seeds[1]))
        if not common:
            raise DataError(f"arms {base.name} (seeds {seeds[0]}) and {other.name} (seeds {seeds[1]}) share no "
                            f"seed; compare runs trained with the same seeds")
        pairs = [(base.runs[seeds[0].index(s)], other.runs[seeds[1].index(s)]) for s in common]
        return pairs, "by seed"
    if len(base.runs) != len(other.runs):
        raise DataError(f"arms {base.name} and {other.name} have {len(base.runs)} and {len(other.runs)} runs and "
                        f"not every seed is known (log/hps.json) or one repeats: give both the same number of "
                        f"runs, in the same seed order")
    return list(zip(base.runs, other.runs)), "by position (seeds unknown or repeated)"


def query_pools(pairs, n_resamples, seed, rng):
    """{metric: [n_pairs, n_resamples]}: other minus base per pair on resamples of the
    queries (of the twin groups), each resample the same for both runs of a pair."""
    runs, n = [a for a, _ in pairs] + [b for _, b in pairs], len(pairs)
    boot = bootstrap_recalls([r.hits for r in runs], n_resamples, seed)
    pools = {k: (boot[k][n:] - boot[k][:n]).numpy() for k in RECALL_KEYS}
    pools["rsum"] = sum(pools[k] for k in RECALL_KEYS)
    if runs[0].twins is not None:
        means = resampled_means(np.concatenate([r.twins for r in runs], 1), n_resamples, rng)
        means = means.reshape(n_resamples, 2 * n, len(TWIN_KEYS))
        for i, key in enumerate(TWIN_KEYS):
            pools[key] = (means[:, n:, i] - means[:, :n, i]).T
    return pools


def difference(base, other, opts):
    """``other`` minus ``base``: per metric the mean per-seed difference, its bootstrap and
    Student-t intervals and the sign-flip p-value."""
    pairs, pairing = paired_runs(base, other)
    per_query = all(r.hits is not None for pair in pairs for r in pair)
    per_seed = {m: np.array([b.metrics[m] - a.metrics[m] for a, b in pairs]) for m in metric_keys(opts)}
    boot = {}
    if opts.bootstrap and (per_query or len(pairs) > 1):
        rng = np.random.default_rng(opts.seed)
        draws = seed_draws(len(pairs), opts.bootstrap, rng)
        if per_query:
            pools = query_pools(pairs, opts.bootstrap * len(pairs), opts.seed, rng)
            boot = {m: two_level_bootstrap(pool, draws) for m, pool in pools.items()}
        else:
            boot = {m: seeds_bootstrap(values, draws) for m, values in per_seed.items()}
    metrics = {m: {"diff": float(d.mean()),
                   "ci95": percentile_interval(torch.from_numpy(boot[m])) if m in boot else None,
                   "p": sign_flip_p(d, opts.seed), "t_ci95": summarise(d)["ci95"], "per_seed": d.tolist()}
               for m, d in per_seed.items()}
    return {"arm": other.name, "minus": base.name, "n": len(pairs), "pairing": pairing,
            "seeds": [a.seed for a, _ in pairs], "interval": "seeds and queries" if per_query else "seeds only",
            "metrics": metrics}


def compute(arms, opts):
    """The result that PREFIX.json holds (fractions)."""
    keys = metric_keys(opts)
    return {"counting": counting_name(opts.original_counting), "bootstrap": opts.bootstrap, "seed": opts.seed,
            "groups_file": opts.groups, "metrics": list(keys),
            "arms": [{"name": arm.name,
                      "runs": [{"entry": r.entry.given, "source": r.source, "seed": r.seed,
                                "kind": "score matrix" if r.hits is not None else "results JSON"} for r in arm.runs],
                      "summary": {m: summarise([r.metrics[m] for r in arm.runs]) for m in keys}} for arm in arms],
            "differences": [difference(arms[0], arm, opts) for arm in arms[1:]]}


def main(opts):
    entries = resolve_arms(opts)
    outputs = output_paths(opts)
    refuse_overwriting_inputs(outputs, entries, opts)
    print_and_write(compute(load_arms(entries, opts), opts), outputs)


if __name__ == "__main__":
    run(main, build_parser())
