"""A training run's curves: log/metrics.jsonl read back, and one picture with a panel per
quantity (loss terms, learning rate, alignment weights, validation recall), several runs
overlaid.

metrics.jsonl holds one JSON object per logged scalar, ``{"step", "name", "value"}``
(``value`` null where it was not finite). A resumed run appends the steps after its
checkpoint again; the last value logged for a step wins.
"""
import json
import math
import os
import re

from .outputs import atomic_write

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
# logged every step but not drawn: counters and throughput
_NOT_DRAWN = {"grad_norm", "skipped_steps"}


def read_metrics(path):
    """{name: (steps, values)} of a metrics.jsonl, sorted by step; for a step logged twice
    (a resumed run) the last value. Lines that do not parse (the last one of a run killed
    while writing it) and null values are left out."""
    points = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                name, step, value = entry["name"], int(entry["step"]), entry["value"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.setdefault(name, {})[step] = float(value)
            else:
                points.setdefault(name, {}).pop(step, None)
    return {name: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for name, by_step in points.items()
            if by_step}


def _natural(name):
    """valid/recall_5 before valid/recall_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _group(name):
    """Panel order: loss terms, the learning rate, alignment weights, validation; None: not drawn."""
    if name in _NOT_DRAWN or name.startswith(("perf/", "eval/")) or name.endswith("ex_per_s"):
        return None
    if "/" not in name:
        return 1 if name == "lr" else 0
    if name.startswith("weight/"):
        return 2
    return 3 if name.startswith("valid/") else None


def panel_names(runs):
    """The quantities drawn for ``runs`` ({label: read_metrics(...)}), in panel order."""
    first = {"loss_step": 0, "loss": 1, "rank_loss": 2}
    names = {name for metrics in runs.values() for name in metrics if _group(name) is not None}
    return sorted(names, key=lambda n: (_group(n), first.get(n, len(first)), _natural(n)))


def draw_curves(runs, path):
    """One PNG at ``path`` (written atomically) with a panel per quantity of ``runs``
    ({label: read_metrics(...)}), each run in its own colour, named in one legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = panel_names(runs)
    if not names:
        raise ValueError("no loss, learning rate or validation scalars to draw")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows + 0.6), squeeze=False)
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for ax, name in zip(axes.flat, names):
        for label, metrics in runs.items():
            if name in metrics:
                steps, values = metrics[name]
                ax.plot(steps, values, color=colours[label], marker="o" if name.startswith("valid/") else None,
                        markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[label], linewidth=2) for label in runs]
    fig.legend(handles, list(runs), loc="lower center", ncol=min(len(runs), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.2 * rows + 0.6), 1, 1))
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def draw_run(log_dir, label=None):
    """log_dir/curves.png from log_dir/metrics.jsonl (one run, named ``label`` or its folder)."""
    label = label or os.path.basename(os.path.dirname(os.path.abspath(log_dir)))
    return draw_curves({label: read_metrics(os.path.join(log_dir, METRICS_NAME))},
                       os.path.join(log_dir, CURVES_NAME))
