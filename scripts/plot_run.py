"""Draw the curves of one or more training runs from their log/metrics.jsonl.

    python scripts/plot_run.py RUN_DIR... [--output FILE.png]

A panel per quantity: the loss terms (loss_step, loss, rank_loss, self_attn_loss and any
alignment objective's), the learning rate, the alignment weights (weight/<objective>)
and the validation scalars (valid/...); the runs overlaid, named in the legend by their
folder. RUN_DIR is a training output_dir or its log/ folder. Training draws the same
picture of itself as log/curves.png when it ends.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
from os.path import abspath, basename, isfile, join, normpath

from utils.cli import run
from utils.config import ConfigError, make_parser
from utils.curves import METRICS_NAME, draw_curves, panel_names, read_metrics
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output_dir(s) (or their log/ folders)")
    p.add_argument("--output", default="curves.png", help="the picture (PNG; default curves.png)")
    return p


def metrics_file(run_dir):
    """RUN_DIR/log/metrics.jsonl, or RUN_DIR/metrics.jsonl for a log folder."""
    for path in (join(run_dir, "log", METRICS_NAME), join(run_dir, METRICS_NAME)):
        if isfile(path):
            return path
    raise ConfigError(f"{run_dir}: no log/{METRICS_NAME} (a training output_dir writes it as it trains)")


def run_label(run_dir, path):
    """The run's folder name (the output_dir's, not log/'s)."""
    folder = os.path.dirname(os.path.dirname(abspath(path)))
    return basename(folder) or normpath(run_dir)


def labelled_runs(run_dirs):
    """{label: metrics} in the order given; a folder name given twice is told apart by its path."""
    files = [metrics_file(d) for d in run_dirs]
    labels = [run_label(d, f) for d, f in zip(run_dirs, files)]
    labels = [normpath(d) if labels.count(label) > 1 else label for d, label in zip(run_dirs, labels)]
    if len(set(labels)) < len(labels):
        raise ConfigError("a run is given twice")
    return files, {label: read_metrics(f) for label, f in zip(labels, files)}


def main(opts):
    refuse_unwritable("--output", opts.output, folder=False)
    files, runs = labelled_runs(opts.runs)
    refuse_overwriting_inputs([("--output", opts.output, opts.output)], [("RUN_DIR", f) for f in files])
    if not panel_names(runs):
        raise ConfigError(f"{', '.join(files)}: no loss, learning rate or validation scalars to draw yet")
    os.makedirs(os.path.dirname(abspath(opts.output)), exist_ok=True)
    print(draw_curves(runs, opts.output))


if __name__ == "__main__":
    run(main, build_parser())
