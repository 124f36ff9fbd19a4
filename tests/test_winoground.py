"""scripts/prepro_winoground.py on a hand-written examples.jsonl, and the whole Winoground path:
txt_db + img_db -> inf_itm.py -> retrieval_metrics.py --groups."""
import json
import os

import numpy as np
import torch

from conftest import FIXTURES, TINY_CONFIG
from data import TxtTokLmdb
from helpers import run

VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "an", "old", "young", "person", "kisses", "mug", "in", "some", "grass", "there", "is", "."]
EXAMPLES = [
    {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "an old person kisses a young person",
     "caption_1": "a young person kisses an old person", "tag": "Object", "num_main_preds": 1},
    {"id": 1, "image_0": "ex_1_img_0", "image_1": "ex_1_img_1", "caption_0": "there is a mug in some grass",
     "caption_1": "there is some grass in a mug", "tag": "Object", "num_main_preds": 1},
]


def write_inputs(tmp_path, examples=EXAMPLES):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return ["scripts/prepro_winoground.py", "--examples", str(tmp_path / "examples.jsonl"),
            "--vocab", str(tmp_path / "vocab.txt"), "--output", str(tmp_path / "txt")]


def test_prepro_winoground_txt_db_and_groups(tmp_path):
    res = run(write_inputs(tmp_path))
    assert res.returncode == 0, res.stderr
    db = TxtTokLmdb(str(tmp_path / "txt" / "itm_winoground.db"), -1)
    ids = {w: i for i, w in enumerate(VOCAB)}
    assert db["winoground_0_1"]["input_ids"] == [ids[w] for w in "a young person kisses an old person".split()]
    assert db["winoground_1_0"]["input_ids"] == [ids[w] for w in "there is a mug in some grass".split()]
    assert db.txt2img == {"winoground_0_0": "ex_0_img_0.npz", "winoground_0_1": "ex_0_img_1.npz",
                          "winoground_1_0": "ex_1_img_0.npz", "winoground_1_1": "ex_1_img_1.npz"}
    assert db.cls_ == 101 and db.sep == 102
    groups = json.loads((tmp_path / "txt" / "winoground_groups.json").read_text())
    assert groups == [{"id": 0, "caption_0": "winoground_0_0", "caption_1": "winoground_0_1",
                       "image_0": "ex_0_img_0.npz", "image_1": "ex_0_img_1.npz"},
                      {"id": 1, "caption_0": "winoground_1_0", "caption_1": "winoground_1_1",
                       "image_0": "ex_1_img_0.npz", "image_1": "ex_1_img_1.npz"}]


def test_prepro_winoground_bad_inputs_are_one_line(tmp_path):
    broken = [dict(EXAMPLES[0]), {k: v for k, v in EXAMPLES[1].items() if k != "caption_1"}]
    res = run(write_inputs(tmp_path, broken))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "examples.jsonl line 2 lacks caption_1" in res.stderr
    args = write_inputs(tmp_path)
    (tmp_path / "examples.jsonl").write_text(json.dumps(EXAMPLES[0]) + "\n{not json\n")
    res = run(args)
    assert res.returncode == 2 and "examples.jsonl line 2: invalid JSON" in res.stderr
    res = run(write_inputs(tmp_path) + ["--img_fname", "{stem}.npz"])
    assert res.returncode == 2 and "--img_fname" in res.stderr
    assert run(write_inputs(tmp_path)).returncode == 0
    res = run(write_inputs(tmp_path))
    assert res.returncode == 2 and "already holds an LMDB" in res.stderr


def test_winoground_scores_from_the_whole_path(tmp_path):
    """Features saved as {image}.npz -> convert_imgdir.py -> inf_itm.py -> retrieval_metrics.py:
    the Winoground scores equal those computed by hand from the score matrix."""
    assert run(write_inputs(tmp_path)).returncode == 0
    feats = tmp_path / "feats" / "winoground"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for example in EXAMPLES:
        for k in (0, 1):
            n = 12
            np.savez(feats / f"{example[f'image_{k}']}.npz", features=rng.random((n, 2048), dtype=np.float32),
                     norm_bb=rng.random((n, 6), dtype=np.float32), conf=np.full(n, 0.9, np.float32),
                     soft_labels=rng.random((n, 1601), dtype=np.float32), nbb=np.array(n))
    res = run(["scripts/convert_imgdir.py", "--img_dir", str(feats), "--output", str(tmp_path / "img"), "--nproc", "1"])
    assert res.returncode == 0, res.stderr
    res = run(["inf_itm.py", "--txt_db", str(tmp_path / "txt" / "itm_winoground.db"), "--img_db",
               str(tmp_path / "img" / "winoground"), "--checkpoint", os.path.join(FIXTURES, "ref_model.pt"),
               "--model_config", TINY_CONFIG, "--output_dir", str(tmp_path / "eval"), "--batch_size", "4",
               "--n_workers", "0"])
    assert res.returncode == 0, res.stderr
    res = run(["scripts/retrieval_metrics.py", str(tmp_path / "eval" / "score_matrix.pt"), "--groups",
               str(tmp_path / "txt" / "winoground_groups.json"), "--output", str(tmp_path / "m.json")])
    assert res.returncode == 0, res.stderr
    saved = torch.load(tmp_path / "eval" / "score_matrix.pt", weights_only=True)

    def s(example, c, i):
        return saved["scores"][saved["txt_ids"].index(f"winoground_{example['id']}_{c}"),
                               saved["img_ids"].index(f"{example[f'image_{i}']}.npz")].item()

    text = [s(e, 0, 0) > s(e, 1, 0) and s(e, 1, 1) > s(e, 0, 1) for e in EXAMPLES]
    image = [s(e, 0, 0) > s(e, 0, 1) and s(e, 1, 1) > s(e, 1, 0) for e in EXAMPLES]
    own = [s(e, 0, 0) > s(e, 0, 1) for e in EXAMPLES] + [s(e, 1, 1) > s(e, 1, 0) for e in EXAMPLES]
    out = json.loads((tmp_path / "m.json").read_text())["winoground"]
    assert out == {"text": sum(text) / 2, "image": sum(image) / 2,
                   "group": sum(t and i for t, i in zip(text, image)) / 2, "own_vs_twin": sum(own) / 4, "n": 2}
