"""Intra-modal Self-attention Distance of a checkpoint on the matched pairs of a split.

    python scripts/isd.py --txt_db demo/txt_db/itm_demo_test.db --img_db demo/img_db/demo \\
        --checkpoint demo/output/ckpt/model_step_2500.pt --model_config config/uniter-demo.json \\
        --output demo/isd [--annotations phrases.json] [--max_pairs 500]

Writes OUTPUT/isd.json (per layer and variant, averaged over heads and pairs; 'mean' over
layers) and OUTPUT/isd.png (one line per variant against the layer). With --annotations,
also ISDa: a JSON object {text_id: [[[word indices], [box indices]], ...]} of
phrase-to-box alignments in the style of Flickr30k Entities; word indices count the
caption's WordPiece tokens from 0 (no [CLS]), box indices the image's regions in img_db
order (see scripts/examples/isda_annotations.json).
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import json
import os
from os.path import join

from data import DataError
from data.groups import annotated_in_split, read_annotations  # noqa: F401  (read_annotations: this script's name)
from model.iais import VARIANTS
from scripts.checkpoint_split import open_split, split_inputs, split_parser
from utils.cli import run
from utils.config import POSITIVE
from model.isd import annotated_isd, layer_attention_blocks, pair_isd
from utils.outputs import atomic_write, refuse_overwriting_inputs, refuse_unwritable, write_json

WRITTEN = ("isd.json", "isd.png")


def check_alignments(txt_id, alignments, n_words, n_boxes, path):
    for words, boxes in alignments:
        if not (0 <= min(words) and max(words) < n_words and 0 <= min(boxes) and max(boxes) < n_boxes):
            raise DataError(f"annotations {path}: {txt_id!r} has {n_words} words and {n_boxes} boxes, but an "
                            f"alignment names words {words} and boxes {boxes}")


def plot(isd, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(int(k.split("_")[1]) for k in isd if k.startswith("layer_"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in VARIANTS + (("ISDa",) if "ISDa" in isd[f"layer_{layers[0]}"] else ()):
        ax.plot(layers, [isd[f"layer_{k}"][v] for k in layers], marker="o", label=v)
    ax.set_xlabel("layer")
    ax.set_ylabel("ISD (symmetric KL)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def build_parser():
    p = split_parser(__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="folder for isd.json and isd.png")
    p.add_argument("--annotations", default=None, help="phrase-to-box alignments (JSON) for ISDa")
    p.add_argument("--max_pairs", type=int, default=1000, valid=POSITIVE, help="matched pairs to average over")
    return p


def check_output(opts):
    """Before any work: OUTPUT can be made and none of the files written there is an input."""
    refuse_unwritable("--output", opts.output, folder=True)
    refuse_overwriting_inputs([("--output", join(opts.output, name), opts.output) for name in WRITTEN],
                              split_inputs(opts) + [("--annotations", opts.annotations)])


def main(opts):
    check_output(opts)
    dataset, model = open_split(opts)
    annotations = read_annotations(opts.annotations) if opts.annotations else {}
    n_layers = model.config.num_hidden_layers
    sums = [{v: 0.0 for v in VARIANTS} for _ in range(n_layers)]
    isda = [[] for _ in range(n_layers)]
    n_pairs = min(opts.max_pairs, len(dataset))
    if opts.annotations:
        annotated_in_split(annotations, opts.annotations, dataset.ids, n_pairs)
    for i in range(n_pairs):
        txt_id, batch, n_words, n_boxes = dataset.pair_batch(i)
        for layer, blocks in enumerate(layer_attention_blocks(model, batch)):
            for v, d in pair_isd(blocks, 0, n_words, n_boxes).items():
                sums[layer][v] += d
            if txt_id in annotations:
                check_alignments(txt_id, annotations[txt_id], n_words, n_boxes, opts.annotations)
                d = annotated_isd(blocks[0][0, :n_words, :n_words], blocks[1][0, :n_boxes, :n_boxes],
                                  annotations[txt_id])
                if d is not None:
                    isda[layer].append(d)
    result = {"pairs": n_pairs, "checkpoint": opts.checkpoint}
    for layer in range(n_layers):
        entry = {v: s / n_pairs for v, s in sums[layer].items()}
        if isda[layer]:
            entry["ISDa"] = sum(isda[layer]) / len(isda[layer])
            entry["ISDa_pairs"] = len(isda[layer])
        result[f"layer_{layer}"] = entry
    result["mean"] = {v: sum(result[f"layer_{k}"][v] for k in range(n_layers)) / n_layers for v in VARIANTS}
    os.makedirs(opts.output, exist_ok=True)
    write_json(join(opts.output, "isd.json"), result, indent=2)
    plot(result, join(opts.output, "isd.png"), os.path.basename(opts.checkpoint))
    print(json.dumps(result["mean"], indent=2))


if __name__ == "__main__":
    run(main, build_parser())
