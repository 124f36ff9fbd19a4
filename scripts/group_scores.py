"""Winoground scores of checkpoints on the twin groups of a split, scoring only each group's
four pairs (not every text against every image).

    python scripts/group_scores.py --txt_db demo/txt_db/itm_demo_test.db --img_db demo/img_db/demo \\
        --groups demo/annotations/groups_test.json --model_config config/uniter-demo.json \\
        --checkpoints demo/output/ckpt/model_step_*.pt --output demo/output/group_scores.json

Writes OUTPUT (JSON): the groups file and, per checkpoint in step order, a point
{step, checkpoint, own_vs_twin, text, image, group, n} (fractions; ``step`` is N of
model_step_N.pt, null for another name). The same numbers as scripts/retrieval_metrics.py
--groups on inf_itm.py's full score matrix, up to floating-point differences of the
batch's padding (ties aside: they fail either way). A groups file is a JSON list of
{caption_0, caption_1, image_0, image_1} (text and image ids of the split).
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)

import torch

from data import ItmValDataset, TxtTokLmdb, open_img_db
from engine.checks import check_split, load_model
from model import IMG_DIM, UniterForImageTextRetrieval, scoring_mode
from utils.checkpoint import step_of
from utils.cli import run
from utils.config import ConfigError, add_box_args, make_parser
from utils.outputs import refuse_overwriting_inputs, refuse_unwritable, write_json
from utils.retrieval_metrics import group_indices, winoground_scores


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--txt_db", required=True, help="text DB of the split the groups come from")
    a("--img_db", required=True, help="image DB of the split")
    a("--groups", required=True, help="groups file: a JSON list of {caption_0, caption_1, image_0, image_1}")
    a("--model_config", required=True, help="model config JSON")
    a("--checkpoints", nargs="+", required=True, help="model weights (model_step_N.pt), one or more")
    a("--output", required=True, help="JSON file of the scores per checkpoint")
    a("--allow_random_init", action="store_true",
      help="accept a checkpoint that leaves part of the model at random initialisation")
    add_box_args(p)
    return p


def group_pairs(groups_path, dataset, txt_db_path):
    """(caption ids, image ids, caption rows, image columns) of the groups: each id that
    they name once, in the split's order, and the groups' rows and columns among them."""
    all_imgs = list(dataset.img2txts)
    rows, cols = group_indices(groups_path, dataset.ids, all_imgs, ids_of=txt_db_path,
                               advice="give the groups of the split it names")
    caption_rows, rows = torch.unique(rows, return_inverse=True)
    image_cols, cols = torch.unique(cols, return_inverse=True)
    return [dataset.ids[i] for i in caption_rows.tolist()], [all_imgs[j] for j in image_cols.tolist()], rows, cols


@torch.no_grad()
def pair_scores(model, dataset, captions, images, rows, cols):
    """[captions x images] scores, NaN except at the groups' pairs (each caption with the two
    images of its group)."""
    scores = torch.full((len(captions), len(images)), float("nan"))
    index = {t: i for i, t in enumerate(dataset.ids)}
    with scoring_mode(model):
        for group_rows, group_cols in zip(rows.tolist(), cols.tolist()):
            img_ids = [images[j] for j in group_cols]
            for r in group_rows:
                s = model(dataset.get_batch(index[captions[r]], img_ids), compute_loss=False)[0]
                scores[r, group_cols] = s.squeeze(1).float()
    return scores


def main(opts):
    refuse_unwritable("--output", opts.output, folder=False)
    inputs = [("--txt_db", opts.txt_db), ("--img_db", opts.img_db), ("--groups", opts.groups),
              ("--model_config", opts.model_config)] + [("--checkpoints", c) for c in opts.checkpoints]
    refuse_overwriting_inputs([("--output", opts.output, opts.output)], inputs)
    txt_db = TxtTokLmdb(opts.txt_db, -1)
    img_db = open_img_db(opts.img_db, opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb, opts.compressed_db)
    dataset = ItmValDataset(txt_db, img_db, 2, setting="group pairs")
    captions, images, rows, cols = group_pairs(opts.groups, dataset, opts.txt_db)
    checkpoints = sorted(opts.checkpoints, key=lambda c: (step_of(c) is None, step_of(c) or 0, c))
    points = []
    for checkpoint in checkpoints:
        model, _ = load_model(UniterForImageTextRetrieval, opts.model_config, checkpoint, opts.allow_random_init,
                              img_dim=IMG_DIM, pairs_num=1)
        if not points:
            check_split(txt_db, img_db, model.config, IMG_DIM)
        scores = pair_scores(model.eval(), dataset, captions, images, rows, cols)
        if not torch.isfinite(scores[rows[:, :, None], cols[:, None, :]]).all():
            raise ConfigError(f"{checkpoint}: the model gives non-finite scores on the groups of {opts.groups}")
        points.append({"step": step_of(checkpoint), "checkpoint": checkpoint,
                       **winoground_scores(scores, rows, cols)})
        print(f"{checkpoint}: " + ", ".join(f"{k} {100 * points[-1][k]:.1f}"
                                            for k in ("own_vs_twin", "text", "image", "group")))
    write_json(opts.output, {"groups_file": opts.groups, "txt_db": opts.txt_db, "img_db": opts.img_db,
                             "points": points}, indent=2)


if __name__ == "__main__":
    run(main, build_parser())
