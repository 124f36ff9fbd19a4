"""Negative sampling: never a ground truth, seeded draws equal to the global generator's,
negatives from declared groups of confusable images; and the image-side masks of the
padded layout (--fix_image_side_masks)."""
import json
import random

import pytest
import torch

from conftest import TINY_CONFIG, load_fixture
from data import DataError, ItmRankDatasetHardNegFromImage, ItmRankDatasetHardNegFromText
from data.groups import read_image_groups
from data.negatives import sample_negative, seeded_draws


def write(tmp_path, content):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_groups_file_formats(tmp_path):
    groups = read_image_groups(write(tmp_path, [
        ["a.npz", "b.npz", "c.npz"],
        {"caption_0": "t1", "caption_1": "t2", "image_0": "a.npz", "image_1": "d.npz"},
        {"caption_0": "t3", "caption_1": "t4", "image_0": "a.npz", "image_1": "d.npz"},
        ["e.npz"]]))
    assert groups == {"a.npz": ["b.npz", "c.npz", "d.npz"], "b.npz": ["a.npz", "c.npz"],
                      "c.npz": ["a.npz", "b.npz"], "d.npz": ["a.npz"]}


@pytest.mark.parametrize("content,message", [
    ({"a.npz": ["b.npz"]}, "expected a JSON list of groups, got dict"),
    ([["a.npz"], "b.npz"], "entry 1 must be a list of image names or an object"),
    ([{"image_0": "a.npz", "image_1": "b.npz"}], "entry 0 must be a list of image names or an object"),
    ([["a.npz", 3]], "entry 0 holds a value that is not an image name")])
def test_malformed_groups_are_named(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_image_groups(write(tmp_path, content))


def test_missing_groups_file(tmp_path):
    with pytest.raises(DataError, match="nope.json not found"):
        read_image_groups(str(tmp_path / "nope.json"))


def _pairs(txt_db):
    """The fixture's images in twos: each image's group is the other one of its pair."""
    images = list(txt_db.img2txts)
    return [images[k:k + 2] for k in range(0, len(images) - 1, 2)]


def test_text_side_negatives_always_hold_the_group(txt_db, img_db):
    groups = read_image_groups_from(_pairs(txt_db))
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3, image_groups=groups)
    for i in range(len(ds)):
        gt = ds.txt2img[ds.ids[i]]
        with seeded_draws(f"7:{i}"):
            batch = ds[i]
        with seeded_draws(f"7:{i}"):
            again = ds[i]
        assert torch.equal(batch["img_feat"], again["img_feat"])  # same seed, same negatives
        assert batch["img_feat"].size(0) == 4
        twin = img_db[groups[gt][0]][0]  # the group member is the first negative
        assert torch.equal(batch["img_feat"][1, :twin.size(0)], twin)
        own = img_db[gt][0]
        assert not any(torch.equal(row[:own.size(0)], own) for row in batch["img_feat"][1:])


def read_image_groups_from(pairs):
    return {a: [b] for a, b in pairs} | {b: [a] for a, b in pairs}


def test_image_side_negatives_hold_the_group_captions(txt_db, img_db):
    pairs = _pairs(txt_db)
    groups = read_image_groups_from(pairs)
    ds = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, image_groups=groups)
    for i in range(len(ds)):
        gt = ds.txt2img[ds.ids[i]]
        twin_captions = txt_db.img2txts[groups[gt][0]]
        with seeded_draws(f"3:{i}"):
            batch = ds[i]
        rows = {tuple(r[r > 0].tolist()) for r in batch["input_ids"][1:]}
        for t in twin_captions[:7]:
            assert tuple(txt_db.combine_inputs(txt_db[t]["input_ids"]).tolist()) in rows
        own = {tuple(txt_db.combine_inputs(txt_db[t]["input_ids"]).tolist()) for t in txt_db.img2txts[gt]}
        assert not own & rows


def test_more_group_members_than_negatives_are_sampled(txt_db, img_db):
    images = list(txt_db.img2txts)
    groups = {images[0]: images[1:6]}  # five members, three negatives
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3, image_groups=groups)
    i = next(k for k, t in enumerate(ds.ids) if ds.txt2img[t] == images[0])
    feats = {name: img_db[name][0] for name in images[1:6]}
    with seeded_draws("1"):
        batch = ds[i]
    for row in batch["img_feat"][1:]:
        assert any(torch.equal(row[:f.size(0)], f) for f in feats.values())


def test_without_groups_the_draws_are_the_original_ones(txt_db, img_db):
    """No group, or an image outside every group: the original's negatives, draw for draw."""
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3, image_groups={"not-in-this-split.npz": ["x.npz"]})
    random.seed(5)
    batch = ds[0]
    random.seed(5)
    negatives = sample_negative(ds.img_name_list, [ds.txt2img[ds.ids[0]]], 3)
    for row, name in zip(batch["img_feat"][1:], negatives):
        f = img_db[name][0]
        assert torch.equal(row[:f.size(0)], f)


def test_padded_masks_score_each_pair_as_alone(txt_db, img_db):
    """With the padded layout's masks every row of an image-side batch scores its pair as the
    pair alone would; with the original's masks the shorter captions score otherwise."""
    from model import UniterConfig, UniterForImageTextRetrievalHardNeg
    config = UniterConfig.from_json_file(TINY_CONFIG)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = UniterForImageTextRetrievalHardNeg.from_pretrained(config, dict(load_fixture("ref_model.pt")),
                                                               img_dim=2048, hard_size=7).eval()
    fixed = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, padded_masks=True)
    quirk = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7)
    random.seed(11)
    a = fixed[4]
    random.seed(11)
    b = quirk[4]
    assert torch.equal(a["input_ids"], b["input_ids"])
    lens = (a["input_ids"] > 0).sum(1)
    assert len(set(lens.tolist())) > 1  # captions of several lengths in the batch
    max_tl, nbb = a["input_ids"].size(1), a["img_feat"].size(1)
    for row, tl in enumerate(lens.tolist()):  # hand-built: the caption, [PAD] masked, every region
        expected = torch.tensor([1] * tl + [0] * (max_tl - tl) + [1] * nbb)
        assert torch.equal(a["attn_masks"][row], expected)
    with torch.no_grad():
        s_fixed, _ = model(a, sample_from="i", compute_loss=False)
        s_quirk, _ = model({k: v for k, v in b.items() if k != "gather_index"}, sample_from="i", compute_loss=False)
        for row, tl in enumerate(lens.tolist()):
            alone = {"input_ids": a["input_ids"][row:row + 1, :tl], "position_ids": torch.arange(tl)[None],
                     "img_feat": a["img_feat"], "img_pos_feat": a["img_pos_feat"],
                     "attn_masks": torch.ones(1, tl + nbb, dtype=torch.long)}
            s_alone, _ = model(alone, sample_from="i", compute_loss=False)
            torch.testing.assert_close(s_fixed[row], s_alone[0], rtol=0, atol=1e-5)
            if tl < max_tl:
                assert (s_quirk[row] - s_alone[0]).abs().item() > 1e-4


def test_group_negatives_resume_where_they_stopped(txt_db, img_db):
    """A stream's saved position gives the same following batches with forced negatives too."""
    from data import ResumableStream, itm_rank_hn_collate
    groups = read_image_groups_from(_pairs(txt_db))
    ds = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, image_groups=groups)
    a = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    for _ in range(65):
        next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(4)]
    b = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    b.load_state_dict(state)
    for e in expected:
        assert torch.equal(next(b)["input_ids"], e)


def test_demo_relations_paired_bootstrap():
    """Seeds and twin groups resampled together: no difference gives [0, 0] and p = 1; a
    variant better on every group of every seed gives an interval above 0."""
    from scripts.relations_stats import paired_bootstrap

    def outcomes(passed):  # every twin group passes (or fails) everything
        flags = torch.full((40,), passed)
        return {"text": flags, "image": flags, "own_0": flags, "own_1": flags}

    same = paired_bootstrap([outcomes(True), outcomes(False)], [outcomes(True), outcomes(False)], n_boot=200)
    assert same["group"] == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "per_seed": [0.0, 0.0]}
    better = paired_bootstrap([outcomes(True)] * 3, [outcomes(False)] * 3, n_boot=200)
    assert better["own_vs_twin"]["diff"] == 1.0 and better["own_vs_twin"]["ci95"] == [1.0, 1.0]
    assert better["group"]["p"] == pytest.approx(2 / 201)
    mixed = paired_bootstrap([outcomes(True), outcomes(False)], [outcomes(False), outcomes(False)], n_boot=400)
    assert mixed["group"]["diff"] == 0.5 and mixed["group"]["ci95"] == [0.0, 1.0]  # one seed of two gains


def test_negatives_never_overlap_positives(txt_db, img_db):
    random.seed(0)
    t = ItmRankDatasetHardNegFromText(txt_db, img_db, 7, False)
    i = ItmRankDatasetHardNegFromImage(txt_db, img_db, 7, False)
    for k in range(len(t)):
        random.seed(k)
        gt = t.txt2img[t.ids[k]]
        assert gt not in sample_negative(t.img_name_list, [gt], 7)
        own = i.img2txts[gt]
        assert not set(own) & set(sample_negative(i.txt_name_list, own, 7))


def test_seeded_draws_equal_the_global_generator_seeded_alike():
    pool = list(range(1000))
    random.seed("7:0:3")
    expected = sample_negative(pool, [5], 20)
    random.seed(0)
    with seeded_draws("7:0:3"):
        assert sample_negative(pool, [5], 20) == expected
    assert sample_negative(pool, [5], 20) == random.Random(0).sample(pool, 20)  # global again outside
