"""Build a small synthetic retrieval data set in the release formats (txt_db + img_db).

Every image holds three objects (of ``--nouns`` kinds) on a 3x3 grid, plus up to
``--background`` background regions; region features are noisy object prototypes (2048-d,
float16), boxes give the positions. Captions name two objects and their spatial relation
("a dog left of a ball"). A fraction of the images (``--twins``; by default all, first in
each split) come in twins: the same objects in other places with every pairwise relation
changed, so that every caption of one twin is false of the other and only the relations
tell them apart.

Besides the DBs: annotations/isda_{split}.json holds each caption's phrase-to-box
alignments (for scripts/isd.py --annotations); annotations/groups_{split}.json the twin
groups, Winoground-style ({"caption_0", "caption_1", "image_0", "image_1"}: caption k true
of image k and false of the other), for evaluation and for training with the twins among
the negatives (negative_groups); train-itm-demo.json the demo's training config with its
paths under --output.

    python scripts/make_demo_data.py --output demo        # ~5 s on 2 cores
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
import time
from os.path import exists, join

import numpy as np

from data import ImgDbWriter, write_txt_db
from scripts.demo_config import write_train_config
from utils.cli import run
from utils.config import POSITIVE, ConfigError, Range, make_parser
from utils.outputs import refuse_unwritable, write_json

NOUNS = ["dog", "cat", "ball", "car", "tree", "chair", "cup", "bird", "book", "lamp", "horse",
         "boat", "hat", "shoe", "clock", "phone", "table", "bike", "kite", "bus", "apple", "bag",
         "bottle", "train", "sheep", "cow", "plate", "bench", "door", "fish", "vase", "bear"]
RELATIONS = ["left", "right", "above", "below"]
WORDS = ["a", "of"] + RELATIONS + NOUNS
FIRST_WORD_ID = 106  # after BERT's [PAD]/[unused]/[UNK]/[CLS]/[SEP]/[MASK] block
META = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103,
        "v_range": [FIRST_WORD_ID, FIRST_WORD_ID + len(WORDS)], "toker": "demo-vocab"}
VOCAB = {w: FIRST_WORD_ID + i for i, w in enumerate(WORDS)}
FEAT_DIM = 2048
GRID = [(0.2 + 0.3 * c, 0.2 + 0.3 * r) for r in range(3) for c in range(3)]  # cell centres


def relation(a, b):
    """Spatial relation of grid cell a to grid cell b (never diagonal to each other)."""
    dx, dy = a % 3 - b % 3, a // 3 - b // 3
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def on_a_diagonal(a, b):
    return abs(a % 3 - b % 3) == abs(a // 3 - b // 3)


def caption(noun_a, noun_b, rel):
    return ["a", noun_a, rel] + (["of"] if rel in ("left", "right") else []) + ["a", noun_b]


class World:
    def __init__(self, seed, n_nouns=len(NOUNS), background=13):
        self.rng = np.random.default_rng(seed)
        proto = lambda n: self.rng.standard_normal((n, FEAT_DIM)).astype(np.float32)
        self.noun_proto, self.background = proto(len(NOUNS)), proto(4)
        self.n_nouns, self.max_background = n_nouns, background

    def box(self, centre, size):
        w, h = size
        x1, y1 = np.clip(centre[0] - w / 2, 0, 1), np.clip(centre[1] - h / 2, 0, 1)
        x2, y2 = np.clip(centre[0] + w / 2, 0, 1), np.clip(centre[1] + h / 2, 0, 1)
        return [x1, y1, x2, y2, x2 - x1, y2 - y1]

    def image(self, objects, cells):
        """Regions of one image: the objects at the given grid cells, then background."""
        rng = self.rng
        feats, boxes = [], []
        for noun, cell in zip(objects, cells):
            feats.append(self.noun_proto[NOUNS.index(noun)] + 0.5 * rng.standard_normal(FEAT_DIM))
            centre = np.array(GRID[cell]) + rng.uniform(-0.04, 0.04, 2)
            boxes.append(self.box(centre, rng.uniform(0.15, 0.25, 2)))
        n_background = rng.integers((self.max_background + 1) // 2, self.max_background + 1) if self.max_background else 0
        for _ in range(n_background):
            feats.append(0.2 * (self.background[rng.integers(4)] + rng.standard_normal(FEAT_DIM)))
            boxes.append(self.box(rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.6, 2)))
        n = len(feats)
        order = rng.permutation(n)  # objects are not always the first regions
        conf = np.concatenate([rng.uniform(0.7, 1.0, len(objects)), rng.uniform(0.25, 0.6, n - len(objects))])
        arrays = {"features": np.stack(feats)[order], "norm_bb": np.array(boxes)[order],
                  "conf": conf[order], "soft_labels": rng.random((n, 1601)) / 1601}
        where = np.argsort(order)  # region index of each object
        return arrays, [int(where[k]) for k in range(len(objects))]

    def images(self, twins):
        """One image, or two (``twins``) with the same three objects in places that change
        every pairwise relation, and their captions: five of each image's six ordered-pair
        captions (none of which holds for its twin)."""
        rng = self.rng
        objects = [NOUNS[i] for i in rng.choice(self.n_nouns, 3, replace=False)]
        layouts = [self._layout()]
        if twins:
            layouts.append(self._relayout(layouts[0]))
        pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
        rels = [[relation(cells[a], cells[b]) for a, b in pairs] for cells in layouts]
        out = []
        for i, cells in enumerate(layouts):
            arrays, regions = self.image(objects, cells)
            shared = [sum(r[k] == rels[i][k] for j, r in enumerate(rels) if j != i) for k in range(len(pairs))]
            order = rng.permutation(len(pairs))
            chosen = sorted(order, key=lambda k: shared[k])[:5]
            caps, alignments = [], []
            for k in chosen:
                a, b = pairs[k]
                words = caption(objects[a], objects[b], rels[i][k])
                caps.append(words)
                # phrase-to-box alignments: the two nouns and their regions
                alignments.append([[[1], [regions[a]]], [[len(words) - 1], [regions[b]]]])
            out.append((arrays, caps, alignments))
        return out

    def _layout(self):
        """Three grid cells, no two on a diagonal, so that every relation is plain from the
        boxes (a diagonal would leave it to the position jitter)."""
        while True:
            cells = self.rng.choice(9, 3, replace=False)
            if not any(on_a_diagonal(cells[a], cells[b]) for a in range(3) for b in range(a + 1, 3)):
                return cells

    def _relayout(self, cells):
        """Other cells for the same objects such that every pairwise relation changes (the
        layout turned by 180 degrees always qualifies)."""
        while True:
            new = self._layout()
            if all(relation(cells[a], cells[b]) != relation(new[a], new[b])
                   for a in range(3) for b in range(a + 1, 3)):
                return new


def build(output, n_train, n_val, n_test, seed, twins=1.0, nouns=8, background=0, conf_th=0.2, max_bb=100,
          min_bb=10):
    refuse_unwritable("--output", output, folder=True)
    if exists(output) and os.listdir(output):
        raise ConfigError(f"{output} is not empty; remove it or choose another --output")
    world = World(seed, nouns, background)
    img_writer = ImgDbWriter(join(output, "img_db", "demo"), conf_th, max_bb, min_bb, compress=False)
    n_img = 0
    os.makedirs(join(output, "annotations"), exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        examples, annotations, groups = {}, {}, []
        n_pairs = int(round(n * twins / 2))
        for twins_now in [True] * n_pairs + [False] * (n - 2 * n_pairs):
            pair = []
            for arrays, caps, alignments in world.images(twins_now):
                fname = f"demo_{n_img:012d}.npz"
                # without background an image has fewer regions than min_bb: keep them all
                img_writer.put(fname, arrays, nbb=min(img_writer.box_count(arrays["conf"]), len(arrays["conf"])))
                pair.append((fname, []))
                for k, (words, align) in enumerate(zip(caps, alignments)):
                    txt_id = f"{split}_{fname[:-4]}_{k}"
                    examples[txt_id] = {"input_ids": [VOCAB[w] for w in words], "img_fname": fname,
                                        "raw": " ".join(words), "id": txt_id}
                    annotations[txt_id] = align
                    pair[-1][1].append(txt_id)
                n_img += 1
            if twins_now:  # caption k of each twin, true of its image and false of the other
                (img_0, caps_0), (img_1, caps_1) = pair
                groups += [{"caption_0": c0, "caption_1": c1, "image_0": img_0, "image_1": img_1}
                           for c0, c1 in zip(caps_0, caps_1)]
        write_txt_db(join(output, "txt_db", f"itm_demo_{split}.db"), examples, META)
        for name, content in (("isda", annotations), ("groups", groups)):
            write_json(join(output, "annotations", f"{name}_{split}.json"), content)
    img_writer.close()
    write_json(join(output, "vocab.json"), VOCAB, indent=0)
    write_train_config(output)
    return n_img


def build_parser():
    p = make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--output", default="demo", help="output directory (txt_db/, img_db/demo/)")
    a("--n_train", type=int, default=1000, valid=POSITIVE, help="training images")
    a("--n_val", type=int, default=100, valid=POSITIVE, help="validation images")
    a("--n_test", type=int, default=100, valid=POSITIVE, help="test images")
    a("--seed", type=int, default=0, valid=Range(0, 2**32 - 1), help="random seed (same seed, same files)")
    a("--twins", type=float, default=1.0, valid=Range(0, 1),
      help="fraction of the images that come in twin pairs (same objects, other places)")
    a("--nouns", type=int, default=8, valid=Range(3, len(NOUNS)), help="kinds of objects")
    a("--background", type=int, default=0, valid=Range(0, 90),
      help="background regions per image: between half this and this many (0: none)")
    return p


def main(args):
    st = time.time()
    n = build(args.output, args.n_train, args.n_val, args.n_test, args.seed, args.twins, args.nouns,
              args.background)
    print(f"wrote {n} images and {5 * n} captions to {args.output} in {time.time() - st:.1f}s")


if __name__ == "__main__":
    run(main, build_parser())
