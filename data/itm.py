"""Image-text matching datasets: hard-negative training groups, quick validation and
full evaluation. Each item is already a batch (DataLoader batch_size=1)."""
import threading
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from utils.distributed import get_rank, get_world_size

from .batch import (RecycledBuffers, compact_attn_masks, get_gather_index, padded_layout_masks,
                    shared_across_batches)
from .errors import DataError
from .img_db import DetectFeatLmdb
from .negatives import negatives_with
from .txt_db import TxtTokLmdb


def get_ids_and_lens(txt_db):
    """This process's share of the text ids (ids[rank::world_size]) and their lengths."""
    ids = list(txt_db.id2len)[get_rank()::get_world_size()]
    return [txt_db.id2len[i] for i in ids], ids


def box_position_features(norm_bb):
    """[..., 6] (x1, y1, x2, y2, w, h) -> [..., 7] with the area w*h appended."""
    return torch.cat([norm_bb, norm_bb[..., 4:5] * norm_bb[..., 5:]], dim=-1)


class DetectFeatTxtTokDataset(Dataset):
    """Captions of this process's shard, with access to their images' features."""

    def __init__(self, txt_db, img_db):
        if not isinstance(txt_db, TxtTokLmdb) or not isinstance(img_db, DetectFeatLmdb):
            raise TypeError("expected a TxtTokLmdb and a DetectFeatLmdb")
        self.txt_db, self.img_db = txt_db, img_db
        self._feat_buffers = RecycledBuffers()
        txt_lens, self.ids = get_ids_and_lens(txt_db)
        if not txt_db.id2len:
            raise DataError(f"{txt_db.db_dir}: no caption left after filtering by max_txt_len; "
                            f"raise --max_txt_len")
        txt2img = txt_db.txt2img
        missing = sorted({txt2img[i] for i in txt_db.id2len if i in txt2img} - set(img_db.name2nbb))
        if missing:
            raise DataError(f"{len(missing)} image(s) of {txt_db.db_dir} are not in {img_db.db_dir} "
                            f"(first: {', '.join(missing[:3])}); check that txt_db and img_db match")
        txt_db.check_links()
        self.lens = [tl + img_db.name2nbb[txt2img[id_]] for tl, id_ in zip(txt_lens, self.ids)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.txt_db[self.ids[i]]

    def _get_img_feat(self, fname):
        feat, norm_bb = self.img_db[fname]
        return feat, box_position_features(norm_bb), feat.size(0)

    def _get_img_feats(self, fnames, recycle=True):
        """Features of several images padded into one tensor:
        (img_feat [n, max_nbb, D] as stored, img_pos_feat [n, max_nbb, 7] float32, num_bbs)."""
        arrays = [self.img_db.read_arrays(f) for f in fnames]
        num_bbs = [a["features"].shape[0] for a in arrays]
        n, max_nbb = len(fnames), max(num_bbs)
        shape, dtype = (n, max_nbb, arrays[0]["features"].shape[1]), arrays[0]["features"].dtype
        feat = self._feat_buffers.empty(shape, dtype) if recycle else np.empty(shape, dtype)
        bb = np.zeros((n, max_nbb, 6), dtype=np.float32)
        for i, (a, nbb) in enumerate(zip(arrays, num_bbs)):
            feat[i, :nbb] = a["features"]
            feat[i, nbb:] = 0
            bb[i, :nbb] = a["norm_bb"]
        return torch.from_numpy(feat), box_position_features(torch.from_numpy(bb)), num_bbs


def _iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, all_rows):
    """Padded layout with the word/box position masks IAIS needs (of row 0 unless all_rows)."""
    attn_masks, words, boxes = padded_layout_masks(txt_lens, num_bbs)
    rows = slice(None) if all_rows else slice(0, 1)
    return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": img_feat,
            "img_pos_feat": img_pos_feat, "attn_masks": attn_masks,
            "txt_attn_masks": words[rows], "img_attn_masks": boxes[rows]}


def _compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, box_start):
    attn_masks = compact_attn_masks(txt_lens, num_bbs)
    gather_index = get_gather_index(txt_lens, num_bbs, len(txt_lens), box_start, attn_masks.size(1))
    return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": img_feat,
            "img_pos_feat": img_pos_feat, "attn_masks": attn_masks, "gather_index": gather_index}


class _HardNegDataset(DetectFeatTxtTokDataset):
    """A positive pair and ``neg_sample_size`` negatives per item; ``IAIS`` (truthy) gives
    the padded layout with the position masks the alignment loss needs. ``image_groups``
    ({image: confusable images}, see data.groups) puts an image's group members (text
    side) or their captions (image side) among its negatives, before the random ones."""

    def __init__(self, txt_db, img_db, neg_sample_size=1, IAIS=False, image_groups=None):
        if neg_sample_size <= 0:
            raise ValueError("neg_sample_size must be at least 1")
        super().__init__(txt_db, img_db)
        txt2img = txt_db.txt2img
        self.txt2img = {id_: txt2img[id_] for id_ in self.ids}
        self.img2txts = txt_db.img2txts
        self.neg_sample_size = neg_sample_size
        self.IAIS = IAIS
        self.image_groups = {img: [m for m in members if m in self.img2txts]
                             for img, members in (image_groups or {}).items() if img in self.img2txts}

    def _check_pool(self, n_candidates, what):
        """Refuse a split that has fewer than ``neg_sample_size`` negatives to draw from."""
        if n_candidates < self.neg_sample_size:
            largest = (n_candidates + 1) // 8 * 8 - 1
            advice = (f"lower --negative_size to {largest} or less" if largest >= 7 else
                      "this split is too small to train with hard negatives (at least 7 are needed)")
            raise DataError(f"{self.txt_db.db_dir}: {what}, fewer than negative_size {self.neg_sample_size} "
                            f"negatives; {advice}")


class ItmRankDatasetHardNegFromText(_HardNegDataset):
    """One caption against its image and ``neg_sample_size`` random other images."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.img_name_list = list(self.img2txts)
        self._check_pool(len(self.img_name_list) - 1,
                         f"{len(self.img_name_list)} images leave {len(self.img_name_list) - 1} other images")

    def __getitem__(self, i):
        txt_id = self.ids[i]
        gt_img = self.txt2img[txt_id]
        input_ids = self.txt_db.combine_inputs(self.txt_db[txt_id]["input_ids"]).unsqueeze(0)
        tl = input_ids.size(1)
        position_ids = torch.arange(tl, dtype=torch.long).unsqueeze(0)
        forced = self.image_groups.get(gt_img, [])
        img_ids = [gt_img] + negatives_with(forced, self.img_name_list, [gt_img], self.neg_sample_size)
        img_feat, img_pos_feat, num_bbs = self._get_img_feats(img_ids)
        txt_lens = [tl] * len(img_ids)
        if self.IAIS:
            return _iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, False)
        return _compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, tl)


class ItmRankDatasetHardNegFromImage(_HardNegDataset):
    """One image against its caption and ``neg_sample_size`` captions of other images.

    Without IAIS the batch is, as in the original, laid out for a compact gather whose
    boxes start after the *last* caption, while the model trains it in the padded layout:
    a caption shorter than the longest attends to [PAD] tokens and loses as many of the
    image's last regions. ``padded_masks`` builds the masks of the padded layout instead
    (every row sees its whole caption and every region; scores equal the pair's alone)."""

    def __init__(self, *args, padded_masks=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.txt_name_list = list(self.txt2img)
        most = max(Counter(self.txt2img.values()).values())
        self._check_pool(len(self.txt_name_list) - most,
                         f"{len(self.txt_name_list)} captions (on this process) minus the {most} of the image "
                         f"with most captions leave {len(self.txt_name_list) - most}")
        self.padded_masks = padded_masks

    def __getitem__(self, i):
        txt_id = self.ids[i]
        gt_img = self.txt2img[txt_id]
        feat, pos, nbb = self._get_img_feat(gt_img)
        forced = [t for img in self.image_groups.get(gt_img, ()) for t in self.img2txts[img]]
        txt_ids = [txt_id] + negatives_with(forced, self.txt_name_list, self.img2txts[gt_img], self.neg_sample_size)
        texts = [self.txt_db.combine_inputs(self.txt_db[t]["input_ids"]) for t in txt_ids]
        txt_lens = [len(t) for t in texts]
        input_ids = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True, padding_value=0)
        position_ids = torch.arange(input_ids.size(1), dtype=torch.long).unsqueeze(0)
        num_bbs = [nbb] * len(txt_ids)
        args = (input_ids, position_ids, feat.unsqueeze(0), pos.unsqueeze(0), txt_lens, num_bbs)
        if self.IAIS:
            return _iais_batch(*args, all_rows=False)
        if self.padded_masks:
            attn_masks, _, _ = padded_layout_masks(txt_lens, num_bbs)
            return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": args[2],
                    "img_pos_feat": args[3], "attn_masks": attn_masks}
        # boxes start after the *last* caption in the original's gather index (see get_gather_index)
        return _compact_batch(*args, box_start=txt_lens[-1])


def itm_rank_hn_collate(inputs):
    assert len(inputs) == 1, "hard-negative datasets yield whole batches; use batch_size=1"
    return inputs[0]


class ItmValDataset(DetectFeatTxtTokDataset):
    """Quick validation: each caption against its image and the next
    ``mini_batch_size - 1`` images of the split (wrapping around)."""

    def __init__(self, txt_db, img_db, mini_batch_size=400, IAIS=False):
        super().__init__(txt_db, img_db)
        del self.lens
        self.txt2img = txt_db.txt2img
        self.img2txts = txt_db.img2txts
        self.all_img_ids = list(self.img2txts)
        self.IAIS = IAIS
        if not 0 < mini_batch_size <= len(self.all_img_ids):
            raise DataError(f"image mini-batch size {mini_batch_size} (inf_minibatch_size; --batch_size "
                            f"of inf_itm.py) must be between 1 and the {len(self.all_img_ids)} "
                            f"images of {txt_db.db_dir}")
        self.bs = mini_batch_size
        self._img_pos = {img: j for j, img in enumerate(self.all_img_ids)}

    def _get_batch_ids(self, i):
        gt_img = self.txt2img[self.ids[i]]
        j = self._img_pos[gt_img]
        n = len(self.all_img_ids)
        return gt_img, [self.all_img_ids[(j + k) % n] for k in range(1, self.bs)]

    def __getitem__(self, i):
        gt_img, neg_imgs = self._get_batch_ids(i)
        return self.get_batch(i, [gt_img] + neg_imgs)

    def get_batch(self, i, img_ids, image_side=None):
        """Caption i against ``img_ids`` (whose ``_get_img_feats`` may be given as ``image_side``)."""
        input_ids = self.txt_db.combine_inputs(self.txt_db[self.ids[i]]["input_ids"])
        tl = input_ids.size(0)
        input_ids = input_ids.unsqueeze(0).expand(len(img_ids), -1).clone()
        position_ids = torch.arange(tl, dtype=torch.long).unsqueeze(0)
        img_feat, img_pos_feat, num_bbs = image_side or self._get_img_feats(img_ids)
        txt_lens = [tl] * len(img_ids)
        if self.IAIS:
            return _iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, True)
        return _compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, tl)


def itm_val_collate(inputs):
    assert len(inputs) == 1, "validation datasets yield whole batches; use batch_size=1"
    return inputs[0]


class _ImageSides:
    """The image side of each evaluation mini-batch, built once per process: it is the same
    for every caption. Not kept in worker processes, which hand every batch over by copy."""

    def __init__(self):
        self._built, self._lock = {}, threading.Lock()

    def get(self, key, build):
        if get_worker_info() is not None:
            return build()
        with self._lock:
            if key not in self._built:
                img_feat, img_pos_feat, num_bbs = build()
                self._built[key] = (shared_across_batches(img_feat), shared_across_batches(img_pos_feat), num_bbs)
            return self._built[key]

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class ItmEvalDataset(ItmValDataset):
    """Full evaluation: each caption against every image of the split, images sorted by
    box count and cut into mini-batches of ``mini_batch_size``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.all_img_ids = sorted(self.all_img_ids, key=lambda i: self.img_db.name2nbb[i])
        self._image_sides = _ImageSides()

    def __getitem__(self, i):
        batches = []
        for st in range(0, len(self.all_img_ids), self.bs):
            img_ids = self.all_img_ids[st:st + self.bs]
            # not in recycled memory: these stay as long as the dataset
            image_side = self._image_sides.get(st, lambda: self._get_img_feats(img_ids, recycle=False))
            batches.append(self.get_batch(i, img_ids, image_side))
        return batches


itm_eval_collate = itm_val_collate
