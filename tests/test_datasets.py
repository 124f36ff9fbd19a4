"""The ITM datasets: the original's batches rebuilt exactly, evaluation order, sharding,
errors, the one-pair batch."""
import json
import logging
import random
import shutil

import pytest
import torch

from conftest import TXT_DB, load_fixture
from helpers import same_batch
from data import (DataError, ItmEvalDataset, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText,
                  ItmValDataset, TxtTokLmdb)
from data.batch import is_shared_across_batches
from utils.row_lengths import RowLengths

CASES = load_fixture("ref_hardneg.pt")


def _rebuild(case, txt_db, img_db):
    cls = ItmRankDatasetHardNegFromText if case["sample_from"] == "t" else ItmRankDatasetHardNegFromImage
    if case["IAIS"]:
        random.seed(6)
        ds = cls(txt_db, img_db, 7, case["IAIS"].split("-")[1])
        items = {0: ds[0]}
        items[17] = ds[17]
    else:
        random.seed(7)
        items = {5: cls(txt_db, img_db, 7, False)[5]}
    return items[case["idx"]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['sample_from']}-{c['IAIS']}-{c['idx']}" for c in CASES])
def test_hard_negative_batches_rebuilt_exactly(case, txt_db, img_db):
    batch = _rebuild(case, txt_db, img_db)
    assert set(batch) == set(case["batch"]) | {"lengths"}
    for k, ref in case["batch"].items():
        assert batch[k].dtype == ref.dtype, k
        assert torch.equal(batch[k], ref), k
    # the lengths the model reads instead of the masks are what the original's masks count
    ref = case["batch"]
    assert batch["lengths"] == RowLengths.of_masks(ref["attn_masks"], ref["input_ids"].size(1),
                                                   ref.get("txt_attn_masks"), ref.get("img_attn_masks"))


def test_eval_dataset_order(txt_db, img_db):
    ref = load_fixture("ref_eval.pt")
    ds = ItmEvalDataset(txt_db, img_db, 8)
    assert ds.ids == ref["txt_ids"] and ds.all_img_ids == ref["img_ids"]
    batches = ds[0]
    assert [b["img_feat"].size(0) for b in batches] == [8, 4]


def test_val_dataset_wraps_around(txt_db, img_db):
    ds = ItmValDataset(txt_db, img_db, 5)
    last = len(ds) - 1
    gt, negs = ds._get_batch_ids(last)
    imgs = ds.all_img_ids
    j = imgs.index(gt)
    assert negs == [imgs[(j + k) % len(imgs)] for k in range(1, 5)]
    assert ds[last]["img_feat"].size(0) == 5


@pytest.mark.parametrize("world", [2, 3])
def test_sharding_is_disjoint_and_complete(txt_db, img_db, world):
    shards = [ItmRankDatasetHardNegFromText(txt_db, img_db, 3, rank=rank, world_size=world).ids
              for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == len(txt_db.id2len)
    assert shards[1] == list(txt_db.id2len)[1::world]


def test_dataset_errors_name_the_culprit(txt_db, img_db):
    with pytest.raises(DataError, match="raise --max_txt_len"):
        ItmRankDatasetHardNegFromText(TxtTokLmdb(TXT_DB, 1), img_db, 3)
    with pytest.raises(DataError, match="mini-batch size 0 .* at least 1"):
        ItmValDataset(txt_db, img_db, 0)


@pytest.mark.parametrize("kind", [ItmValDataset, ItmEvalDataset])
def test_a_mini_batch_larger_than_the_split_is_reduced_to_it(txt_db, img_db, kind, caplog, monkeypatch):
    monkeypatch.setattr("data.itm._said", set())  # each reduction is said once per process
    n_images = len(txt_db.img2txts)
    fitting = kind(txt_db, img_db, n_images)
    with caplog.at_level(logging.INFO, logger="iais"):
        larger = kind(txt_db, img_db, n_images + 388, setting="--batch_size")
    assert larger.bs == n_images
    said = [r.getMessage() for r in caplog.records if "is more than" in r.getMessage()]
    assert said == [f"--batch_size {n_images + 388} is more than the {n_images} images of {txt_db.db_dir}: "
                    f"using {n_images}"]
    for i in (0, len(fitting) - 1):
        a, b = fitting[i], larger[i]
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert same_batch(x, y)


def test_captions_without_image_are_reported(tmp_path, img_db):
    bad = tmp_path / "txt"
    shutil.copytree(TXT_DB, bad)
    t2i = json.loads((bad / "txt2img.json").read_text())
    first = next(iter(t2i))
    t2i[first] = "missing_image.npz"
    (bad / "txt2img.json").write_text(json.dumps(t2i))
    with pytest.raises(DataError, match=r"1 image\(s\).*missing_image.npz"):
        ItmRankDatasetHardNegFromText(TxtTokLmdb(str(bad), -1), img_db, 3)


def test_text_side_batches_stay_intact_while_held(txt_db, img_db):
    random.seed(0)
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    random.seed(1)
    kept = ds[0]
    copy = {k: v.clone() for k, v in kept.items() if torch.is_tensor(v)}
    for i in range(1, 5):
        ds[i]
    assert all(torch.equal(kept[k], v) for k, v in copy.items())
    random.seed(1)
    again = ds[0]
    assert all(torch.equal(again[k], v) for k, v in copy.items())


def test_eval_image_sides_are_built_once_and_marked(txt_db, img_db):
    """Every caption's mini-batch j holds the same image tensors, equal to a fresh build."""
    ds = ItmEvalDataset(txt_db, img_db, 8)
    first, second = ds[0], ds[5]
    assert len(first) == 2  # 12 images in mini-batches of 8
    for j, (a, b) in enumerate(zip(first, second)):
        for k in ("img_feat", "img_pos_feat"):
            assert a[k] is b[k] and is_shared_across_batches(a[k])
        fresh = ds.get_batch(5, ds.all_img_ids[8 * j:8 * j + 8])
        assert fresh.keys() == b.keys() and same_batch(fresh, b)
        assert not is_shared_across_batches(fresh["img_feat"])
    text_side = [v for k, v in first[0].items() if torch.is_tensor(v) and k not in ("img_feat", "img_pos_feat")]
    assert not any(map(is_shared_across_batches, text_side))


def test_pair_batch_is_the_one_image_validation_batch(txt_db, img_db):
    """Caption i with its own image: the IAIS validation batch against that image alone,
    with the caption's word count (no [CLS]/[SEP]) and the image's box count."""
    hard = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    val = ItmValDataset(txt_db, img_db, 1, IAIS=True)
    for i in (0, 17, len(val) - 1):
        txt_id, batch, n_words, n_boxes = hard.pair_batch(i)
        ref = val[i]
        assert txt_id == val.ids[i]
        assert same_batch(batch, ref)
        assert n_words == len(txt_db[txt_id]["input_ids"]) == int(batch["txt_attn_masks"].sum())
        assert n_boxes == img_db.name2nbb[txt_db.txt2img[txt_id]] == int(batch["img_attn_masks"].sum())


def test_image_side_negatives_come_from_its_own_shard(txt_db, img_db):
    ds = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, rank=1, world_size=2)
    assert ds.txt_name_list == ds.ids == list(txt_db.id2len)[1::2]
    assert ds.txt2img == txt_db.txt2img  # the whole split's links, as CaptionDataset documents
    assert ds[0]["input_ids"].size(0) == 8  # its caption and 7 negatives


def test_rank_outside_the_world_is_refused(txt_db, img_db):
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        ItmEvalDataset(txt_db, img_db, 8, rank=2, world_size=2)


def test_one_collate_for_every_dataset(txt_db, img_db):
    from data import itm_eval_collate, itm_rank_hn_collate, itm_val_collate
    assert itm_rank_hn_collate is itm_val_collate is itm_eval_collate
    batch = ItmValDataset(txt_db, img_db, 5)[0]
    assert itm_val_collate([batch]) is batch
    with pytest.raises(AssertionError, match="batch_size=1"):
        itm_val_collate([batch, batch])
