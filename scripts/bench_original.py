"""The original code's throughput on the workloads of scripts/bench.py, on the same DBs
and weights, so that the project's speed-ups can be stated against the original itself.

    python scripts/bench_original.py --original_repo ~/src/IAIS --data /tmp/iais_bench_db \\
        --weights weights.pt --output original.json

Usually run by ``scripts/bench.py --original_repo DIR``, which builds the DBs, writes the
weights and compares the scores. ``--original_repo`` is a checkout of lancopku/IAIS. Its
modules are imported unchanged from there; what it imports but no longer runs with today
(apex, horovod, the heatmap helper it never ships, toolz) is stood in for by the smallest
equivalents, written to a temporary folder. Only its CUDA-free parts are used: the text-
and image-side hard-negative datasets and UniterForImageTextRetrievalHardNeg.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
from os.path import abspath, join

from scripts.original_checkout import ORIGINAL_MODULES, check_checkout
from scripts.timing import rate

STAND_INS = {
    # FusedLayerNorm computes what nn.LayerNorm computes; the CUDA kernel is all apex adds
    "apex/__init__.py": "",
    "apex/normalization/__init__.py": "",
    "apex/normalization/fused_layer_norm.py": "from torch.nn import LayerNorm as FusedLayerNorm\n",
    # the datasets ask horovod for this process's shard of the text DB: one process, all of it
    "horovod/__init__.py": "",
    "horovod/torch.py": "def init():\n    pass\n\n\ndef rank():\n    return 0\n\n\n"
                        "def size():\n    return 1\n\n\ndef local_size():\n    return 1\n",
    "utils/__init__.py": "",
    "utils/heatmap.py": "def plot_attention_headmap(*args, **kwargs):\n    pass\n",
    "data/__init__.py": "",
    "model/__init__.py": "",
}
TOOLZ = {
    "toolz/__init__.py": "",
    "toolz/sandbox.py": "def unzip(seq):\n    return tuple(zip(*seq))\n",
    "cytoolz.py": "import itertools\n\n\ndef concat(seqs):\n    return itertools.chain.from_iterable(seqs)\n\n\n"
                  "def partition_all(n, seq):\n    it = iter(seq)\n    while True:\n"
                  "        chunk = tuple(itertools.islice(it, n))\n        if not chunk:\n            return\n"
                  "        yield chunk\n",
}
def import_tree(original_repo):
    """A folder that imports as the original's ``data`` and ``model`` packages."""
    check_checkout(original_repo)
    root = tempfile.mkdtemp(prefix="iais_original_")
    files = dict(STAND_INS)
    if importlib.util.find_spec("cytoolz") is None or importlib.util.find_spec("toolz") is None:
        files.update(TOOLZ)
    for path, text in files.items():
        os.makedirs(join(root, os.path.dirname(path)), exist_ok=True)
        with open(join(root, path), "w") as f:
            f.write(text)
    for m in ORIGINAL_MODULES:
        os.symlink(join(abspath(original_repo), m), join(root, m))
    return root


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--original_repo", required=True, help="a checkout of lancopku/IAIS")
    p.add_argument("--data", required=True, help="DBs written by scripts/bench.py (make_bench_db)")
    p.add_argument("--weights", required=True, help="state dict of the 4-layer bench model")
    p.add_argument("--output", required=True, help="JSON results")
    p.add_argument("--scores", default=None, help="where to save the original's bench scores and losses")
    p.add_argument("--min_time", type=float, default=3.0, help="seconds per measurement")
    return p.parse_args()


def dataset_rates(txt, img, min_time):
    """The original datasets' rates: text- and image-side micro-batches, evaluation items."""
    from data.itm import ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText
    text_side = ItmRankDatasetHardNegFromText(txt, img, 399)
    image_side = ItmRankDatasetHardNegFromImage(txt, img, 399)
    it = iter(range(10 ** 9))
    out = {"original_text_side_micro_batches_per_s": rate(lambda: text_side[next(it) % len(text_side)], min_time),
           "original_image_side_micro_batches_per_s": rate(lambda: image_side[next(it) % len(image_side)],
                                                           min_time)}
    full = ItmEvalDataset(txt, img, 400)
    out["original_eval_items_per_s"] = rate(lambda: full[next(it) % len(full)], min_time)
    return out


def model_rates(txt, img, weights, min_time):
    """(the original model's scoring and training rates with the bench weights, its scores and
    losses for bench.py to compare)."""
    import torch
    from data.itm import ItmRankDatasetHardNegFromText
    from model.itm import UniterForImageTextRetrievalHardNeg
    from model.model import UniterConfig
    config = UniterConfig(28996, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterForImageTextRetrievalHardNeg(config, 2048, hard_size=7)
    model.load_state_dict(torch.load(weights, weights_only=True))

    def text_side_batch(seed, IAIS=False, index=0):
        random.seed(seed)
        return ItmRankDatasetHardNegFromText(txt, img, 63, IAIS)[index]

    out, saved = {}, {}
    batch = text_side_batch(0)
    model.eval()
    with torch.no_grad():
        saved["eval_scores"] = model(batch, "t", compute_loss=False)
        out["original_eval_pairs_per_s"] = 64 * rate(lambda: model(batch, "t", compute_loss=False), min_time)
    for iais in (False, "singular"):
        batch = text_side_batch(1, iais, 3)
        key = "iais" if iais else "plain_loss"

        def step():
            model.train()
            model.zero_grad()
            result = model(batch, "t", compute_loss=True, IAIS=f"L-{iais}" if iais else False)
            loss = result[0].mean() + result[1]["self_attn_loss"] if iais else result.mean()
            loss.backward()
            return loss

        saved[f"train_{key}_loss"] = step().detach()
        out[f"original_train_{key}_steps_per_s"] = rate(step, min_time)
    return out, saved


def main():
    opts = parse_args()
    # The original's modules import each other and their stand-ins as top-level packages
    # (data, model, apex, horovod, ...), so its tree must come first on the import path. That
    # is why this runs in a process of its own, which imports no data or model of this project.
    sys.path.insert(0, import_tree(opts.original_repo))
    import torch
    from data.data import DetectFeatLmdb, TxtTokLmdb

    torch.set_num_threads(os.cpu_count())
    txt = TxtTokLmdb(join(opts.data, "txt"), 60)
    img = DetectFeatLmdb(join(opts.data, "img"), 0.2, 100, 10, 36, False)
    out = dataset_rates(txt, img, opts.min_time)
    rates, saved = model_rates(txt, img, opts.weights, opts.min_time)
    out.update(rates)
    if opts.scores:
        torch.save(saved, opts.scores)
    with open(opts.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
